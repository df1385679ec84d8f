"""Calibration and evaluation windows, and their errors."""

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


@pytest.mark.parametrize("split,sha256", [
    ("test", "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"),
    ("calibration", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8")])
def test_wikitext2_ships_with_the_package(split, sha256, monkeypatch):
    """Without SVDKERN_DATA_DIR (offline or not) every command reads the same WikiText-2 text."""
    import gzip
    import hashlib
    import io

    monkeypatch.delenv("SVDKERN_DATA_DIR", raising=False)
    text, described = data.text_source("wikitext2", split)
    raw = gzip.decompress((data.PACKAGED / (data._WIKITEXT2[split][0] + ".gz")).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == sha256  # the published file, byte for byte
    assert text == io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8").read()  # read as a text file is
    assert described.startswith("WikiText-2 ") and "packaged with svdkern" in described


def test_data_dir_overrides_the_packaged_copy(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text("my own test split")
    monkeypatch.setenv("SVDKERN_DATA_DIR", str(tmp_path))
    assert data.load_text("wikitext2", "test") == "my own test split"
    with pytest.warns(UserWarning, match="using the copy packaged with svdkern"):
        assert len(data.load_text("wikitext2", "calibration")) > 1_000_000


def test_plain_text_file(tmp_path):
    (tmp_path / "t.txt").write_text("hello world")
    assert data.load_text(str(tmp_path / "t.txt"), "test") == "hello world"
