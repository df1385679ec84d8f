"""Calibration and evaluation windows, and their errors."""
import os

import pytest
import torch

from svdkern import data
from svdkern.data import DataError


def test_token_windows_dev_protocol_starts():
    ids = torch.arange(10_000)
    w = data.token_windows(ids, 64, 512, seed=0)
    starts = torch.randint(0, 10_000 - 512, (64,), generator=torch.Generator().manual_seed(0))
    assert w.shape == (64, 512) and torch.equal(w[:, 0], starts)


def test_eval_windows_are_consecutive_and_drop_the_remainder():
    w = data.eval_windows(torch.arange(1030), 100)
    assert w.shape == (10, 100) and w[3, 0] == 300 and w[-1, -1] == 999
    assert data.eval_windows(torch.arange(1030), 100, windows=4).shape == (4, 100)


@pytest.mark.parametrize("call,match", [
    (lambda: data.token_windows(torch.arange(100), 0, 10, 0), "nsamples"),
    (lambda: data.token_windows(torch.arange(100), 4, 1, 0), "seqlen"),
    (lambda: data.token_windows(torch.arange(100), 4, 200, 0), "too few"),
    (lambda: data.eval_windows(torch.arange(10), 20), "fewer than one window"),
    (lambda: data.load_text("/no/such/file.txt", "test"), "neither"),
])
def test_bad_requests_raise(call, match):
    with pytest.raises(DataError, match=match):
        call()


def test_local_wikitext2_is_found():
    text = data.load_text("wikitext2", "test")
    assert len(text) > 1_000_000 and "Robert Boulter" in text[:2000]


def test_offline_fallback_warns(monkeypatch):
    monkeypatch.delenv("SVDKERN_DATA_DIR", raising=False)
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.warns(UserWarning, match="pydoc_data"):
        text = data.load_text("wikitext2", "calibration")
    assert len(text) > 100_000


def test_plain_text_file(tmp_path):
    (tmp_path / "t.txt").write_text("hello world")
    assert data.load_text(str(tmp_path / "t.txt"), "test") == "hello world"
