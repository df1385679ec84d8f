"""The fused low-rank kernels against the float64 reference (the interpreter on CPU CI).

Error budget (flash-attention's rule): no worse than twice what PyTorch's own two-matmul path
loses in the same dtype, plus a small absolute floor for near-zero outputs.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import svdkern
from svdkern.reference import lowrank_linear_ref

triton = pytest.importorskip("triton")
from svdkern.backends import triton_lowrank  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def short_autotuning():
    """Autotuning here times a few ms per config, not Triton's 25 + 100 (hundreds of new keys on
    a GPU), for this module only: autotuners are made anew, and both are restored after it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SVDKERN_AUTOTUNE_MS", os.environ.get("SVDKERN_AUTOTUNE_MS", "2,10"))
        mp.setattr(triton_lowrank, "_tuned_kernels", {})
        yield


def forget_launches(monkeypatch):
    """As in a fresh process: no config chosen, no kernel launched (the three are reset together)."""
    for name, empty in (("_chosen", {}), ("_loaded", set()), ("_seen", set())):
        monkeypatch.setattr(triton_lowrank, name, empty)


def make(T, n, m, k, dtype, seed=0, bias=True, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, T, n, generator=g)
    V = torch.randn(k, n, generator=g) / n ** 0.5
    U = torch.randn(m, k, generator=g) / k ** 0.5
    b = torch.randn(m, generator=g) if bias else None
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(x), to(U), to(V), to(b)


def torch_same_dtype(x, U, V, b):
    return F.linear(F.linear(x, V), U, b)


def assert_within_torch_error(y, x, U, V, b):
    ref = lowrank_linear_ref(x.cpu(), U.cpu(), V.cpu(), None if b is None else b.cpu())
    err = (y.double().cpu() - ref).abs().max().item()
    base = (torch_same_dtype(x, U, V, b).double().cpu() - ref).abs().max().item()
    floor = 1e-6 if x.dtype == torch.float32 else 1e-3
    assert err <= 2 * base + floor * ref.abs().max().item(), (err, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,k", [(1, 1), (1, 100), (3, 17), (17, 100), (130, 1), (130, 17)])
def test_matches_reference_on_awkward_shapes(dtype, T, k):
    """Every T meets a rank of 1 and a larger one, decode and prefill alike; pairs rather than
    the cross product keep the GPU's autotuning to a dozen keys per dtype."""
    x, U, V, b = make(T, 67, 45, k, dtype, seed=T * 1000 + k)
    y = triton_lowrank.lowrank_linear(x, U, V, b)
    assert y.shape == (T, 45) and y.dtype == dtype
    assert_within_torch_error(y, x, U, V, b)


@pytest.mark.parametrize("T", [2, 40])
def test_leading_dims_no_bias_and_strided_inputs(T):
    x, U, V, _ = make(T, 33, 29, 9, torch.float32, lead=(2,), bias=False)
    y = triton_lowrank.lowrank_linear(x, U, V)
    assert y.shape == (2, T, 29)
    assert_within_torch_error(y, x, U, V, None)
    # non-contiguous: a transposed view of x, and factors that are views of wider storage
    xt = x.transpose(0, 1)
    Uw = torch.cat([U, U], dim=1)[:, ::2]
    y2 = triton_lowrank.lowrank_linear(xt, Uw, V)
    assert_within_torch_error(y2, xt, Uw, V, None)


def test_rec_concatenated_factors_are_one_rank():
    x, U1, V1, b = make(5, 40, 30, 7, torch.float32)
    _, U2, V2, _ = make(5, 40, 30, 3, torch.float32, seed=1)
    U, V = torch.cat([U1, U2], 1), torch.cat([V1, V2], 0)
    y = triton_lowrank.lowrank_linear(x, U, V, b)
    expected = F.linear(F.linear(x, V1), U1, b) + F.linear(F.linear(x, V2), U2)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (lambda x, U, V: (x.double(), U.double(), V.double()), "fp16, bf16 and fp32"),
    (lambda x, U, V: (x, U.half(), V), "share one dtype"),
    (lambda x, U, V: (x, U, V[:, :-1]), "features"),
    (lambda x, U, V: (x, U[:, :-1], V), "U \\(m, k\\) and V \\(k, n\\)"),
])
def test_bad_inputs_are_rejected(bad, match):
    x, U, V, _ = make(3, 16, 8, 4, torch.float32, bias=False)
    with pytest.raises((TypeError, ValueError), match=match):
        triton_lowrank.lowrank_linear(*bad(x, U, V))


def forced_triton_calls(monkeypatch) -> list:
    """Force the Triton path and record each call of its launcher."""
    monkeypatch.setenv("SVDKERN_IMPL", "triton")
    calls = []
    real = triton_lowrank.lowrank_linear
    monkeypatch.setattr(triton_lowrank, "lowrank_linear", lambda *a: calls.append(1) or real(*a))
    return calls


def test_op_and_layer_dispatch_to_triton_when_forced(monkeypatch):
    x, U, V, b = make(4, 24, 20, 5, torch.float32)
    calls = forced_triton_calls(monkeypatch)
    y_op = svdkern.lowrank_linear(x, U, V, b)
    layer = svdkern.LowRankLinear.from_factors(U, V, b)
    with torch.no_grad():
        y_layer = layer(x)
    assert len(calls) == 2
    torch.testing.assert_close(y_op, y_layer)
    assert_within_torch_error(y_op, x, U, V, b)


def test_torch_compile_traces_the_op():
    x, U, V, b = make(3, 24, 20, 5, torch.float32)
    fn = torch.compile(lambda *a: svdkern.lowrank_linear(*a) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x, U, V, b), 2 * svdkern.lowrank_linear(x, U, V, b))


# ------------------------------------------------------------------ GPU only

@needs_cuda
@pytest.mark.parametrize("T", [1, 16, 2048])
@pytest.mark.parametrize("m,n,k", [(4096, 4096, 1229), (11008, 4096, 1791), (4096, 11008, 1791)])
def test_gpu_large_bf16(T, m, n, k):
    x, U, V, b = make(T, n, m, k, torch.bfloat16)
    assert_within_torch_error(triton_lowrank.lowrank_linear(x, U, V, b), x, U, V, b)


@needs_cuda
@pytest.mark.parametrize("T", [1, 8, 300])
def test_gpu_cuda_graph_replay_and_determinism(T):
    x, U, V, b = make(T, 1024, 768, 200, torch.bfloat16)
    triton_lowrank.lowrank_linear(x, U, V, b)  # autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = triton_lowrank.lowrank_linear(x, U, V, b)
    graph.replay()
    first = y.clone()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    eager = triton_lowrank.lowrank_linear(x, U, V, b)
    if T > triton_lowrank.DECODE_MAX_TOKENS:  # no atomics in prefill: bit-exact
        assert torch.equal(y, first) and torch.equal(eager, first)
    else:  # split-K atomics: order-dependent fp32 sums, within rounding of one another
        torch.testing.assert_close(y, first, rtol=1e-2, atol=1e-2)
    assert_within_torch_error(first, x, U, V, b)


@needs_cuda
def test_gpu_deterministic_decode_is_bit_exact():
    x, U, V, b = make(4, 2048, 1536, 300, torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        first = triton_lowrank.lowrank_linear(x, U, V, b)
        assert all(torch.equal(triton_lowrank.lowrank_linear(x, U, V, b), first) for _ in range(5))
        # batch invariance: a token's output does not depend on its neighbours
        assert torch.equal(triton_lowrank.lowrank_linear(x[:1], U, V, b), first[:1])
    finally:
        torch.use_deterministic_algorithms(False)
    assert_within_torch_error(first, x, U, V, b)


def test_generate_runs_through_the_kernels(monkeypatch, windows):
    """On the device the kernels run on: CUDA on a GPU, else the CPU through the interpreter."""
    from conftest import tiny_model

    model = tiny_model("llama", seed=3)
    svdkern.compress(model, "svd", 0.3, progress=False)
    model.to(DEVICE)
    prompt = windows[:1, :5].to(DEVICE)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    monkeypatch.setenv("SVDKERN_IMPL", "torch")
    expected = model.generate(prompt, **kwargs)
    monkeypatch.setenv("SVDKERN_IMPL", "triton")
    calls = []
    real = triton_lowrank.lowrank_linear
    monkeypatch.setattr(triton_lowrank, "lowrank_linear", lambda *a: calls.append(a[0].shape[:-1].numel()) or real(*a))
    got = model.generate(prompt, **kwargs)
    assert torch.equal(got, expected)
    assert 5 in calls and 1 in calls  # the prefill and the one-token decode steps


def test_strided_bias_is_read_by_its_stride():
    """A bias that is a view (every other element of a wider tensor) must not be read as contiguous."""
    x, U, V, _ = make(6, 21, 13, 5, torch.float32, bias=False)
    wide = torch.randn(26, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    b = wide[::2]
    y = triton_lowrank.lowrank_linear(x, U, V, b)
    assert_within_torch_error(y, x, U, V, b)


def test_layer_outside_no_grad_stays_fused_unless_trained(monkeypatch):
    x, U, V, b = make(4, 24, 20, 5, torch.float32)
    calls = forced_triton_calls(monkeypatch)
    layer = svdkern.LowRankLinear.from_factors(U, V, b)
    assert not any(p.requires_grad for p in layer.parameters())  # frozen: inference by default
    y = layer(x)  # grad mode on, as in a plain script
    assert len(calls) == 1 and not y.requires_grad
    layer.requires_grad_(True)  # fine-tuning takes the autograd path and gets gradients
    layer(x).sum().backward()
    assert len(calls) == 1 and layer.U.grad is not None and layer.V.grad is not None


def check_offsets_past_two_to_the_31():
    """Row × stride past 2³¹ elements (long prefills at width 11008): offsets must be int64.

    Strided views into a large, never-touched allocation put the last rows of A (the input) and
    C (the output) past 2³¹ elements while only a few pages are used (~0.4 GB resident).
    """
    rows, cols, stride = 1040, 24, 1 << 21  # rows · stride ≈ 2.18e9 > 2³¹
    g = torch.Generator().manual_seed(11)
    device = DEVICE
    big_a = torch.empty(rows * stride, dtype=torch.float16, device=device)
    big_c = torch.empty(rows * stride, dtype=torch.float16, device=device)
    a = big_a.as_strided((rows, cols), (stride, 1))
    a.copy_(torch.randn(rows, cols, generator=g))
    c = big_c.as_strided((rows, 40), (stride, 1))
    b = torch.randn(40, cols, generator=g).half().to(device)
    triton_lowrank._launch("prefill", a, b, c, None, split_default=1)
    expected = a.double() @ b.double().T
    torch.testing.assert_close(c.double(), expected, rtol=2e-3, atol=2e-3)


def test_offsets_past_two_to_the_31_do_not_wrap():
    """In a child process: wrapped int32 offsets crash (segfault) rather than fail."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", "import conftest, test_lowrank_triton as t; "
                           "t.check_offsets_past_two_to_the_31()"],
                          cwd=here, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"


def test_bias_on_another_device_is_rejected():
    x, U, V, _ = make(3, 16, 8, 4, torch.float32, bias=False)
    with pytest.raises(ValueError, match="one device"):
        triton_lowrank.lowrank_linear(x, U, V, torch.zeros(8, device="meta"))


def test_configs_come_from_the_table_by_token_bucket(tmp_path, monkeypatch):
    from svdkern.backends import lowrank_configs as lc

    assert [lc.token_bucket(t) for t in (1, 2, 3, 16, 17, 512, 513, 100000)] == \
        [1, 2, 4, 16, 32, 512, 1024, lc.MAX_BUCKET]
    small = dict(triton_lowrank.candidates("prefill")[0], BLOCK_M=64)
    large = dict(triton_lowrank.candidates("prefill")[0], BLOCK_M=256)
    bf16 = torch.bfloat16
    path = str(tmp_path / "lowrank_Some_GPU.json")
    lc.write_table(path, "Some GPU", {"prefill": {lc.shape_key(4096, 1229, bf16): {64: small, 2048: large}}},
                   {"commit": "x"})
    table = lc.load_table(path)
    assert lc.lookup(table, "prefill", 50, 4096, 1229, bf16) == small      # bucket 64
    assert lc.lookup(table, "prefill", 3000, 4096, 1229, bf16) == large    # bucket 4096: nearest is 2048
    assert lc.lookup(table, "prefill", 400, 4096, 1229, bf16) == large     # 512: 64 and 2048 are 3 and 2 steps
    assert lc.lookup(table, "prefill", 100, 4096, 1229, bf16) == small     # 128: one step from 64
    assert lc.lookup(table, "prefill", 50, 4096, 1216, bf16) == small      # an aligned rank: nearest shape
    assert lc.lookup(table, "prefill", 50, 4096, 1600, bf16) is None       # 30% away: autotune
    assert lc.lookup(table, "prefill", 50, 4096, 1229, torch.float32) is None  # fp32 tiles differ
    assert lc.lookup(table, "expand", 1, 4096, 1229, bf16) is None
    # the launcher's choice: the table's (remembered by bucket), else None (autotune; in capture: refuse)
    forget_launches(monkeypatch)
    monkeypatch.setattr(triton_lowrank, "_table_of", lambda index: table)
    assert triton_lowrank._config_for("prefill", 0, 64, 50, 4096, 1229, bf16) == small
    assert triton_lowrank._config_for("prefill", 0, 64, 50, 77, 33, bf16) is None
    monkeypatch.setattr(triton_lowrank, "_table_of", lambda index: {})
    assert triton_lowrank._config_for("prefill", 0, 64, 60, 4096, 1229, bf16) == small  # remembered


def test_a_bad_config_table_names_the_fix(tmp_path):
    from svdkern.backends import lowrank_configs as lc

    path = tmp_path / "lowrank_x.json"
    path.write_text('{"configs": {"prefill": {"64,32,bfloat16": {"16": {"BLOCK_M": 16}}}}}')
    with pytest.raises(ValueError, match="tune_lowrank.py"):
        lc.load_table(str(path))
    path.write_text('{"configs": {"prefill": {"64,32": {"16": {}}}}}')  # before dtype was in the key
    lc.load_table.cache_clear()
    with pytest.raises(ValueError, match="not 'N,K,dtype'.*tune_lowrank.py"):
        lc.load_table(str(path))
    path.write_text('{"configs": {"decode": {}}}')
    lc.load_table.cache_clear()
    with pytest.raises(ValueError, match="unknown regime"):
        lc.load_table(str(path))


@needs_cuda
def test_gpu_graph_capture_needs_warm_up(monkeypatch):
    """A shape first met inside capture: a clear error before warm_up, a correct replay after."""
    forget_launches(monkeypatch)
    x, U, V, b = make(9, 328, 264, 77, torch.bfloat16)
    layer = svdkern.LowRankLinear.from_factors(U, V, b)
    with pytest.raises(triton_lowrank.NotWarmedUpError, match=r"svdkern\.warm_up\(model, token_counts=\(9,\)\)"):
        with torch.no_grad(), torch.cuda.graph(torch.cuda.CUDAGraph()):
            layer(x)
    assert svdkern.warm_up(layer, token_counts=(9,)) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert_within_torch_error(y, x, U, V, b)


def test_capture_runs_only_kernels_loaded_before_it(monkeypatch):
    """The capture check's logic on the CPU: the capture test is faked, the kernels are real."""
    monkeypatch.setenv("SVDKERN_IMPL", "triton")
    forget_launches(monkeypatch)
    capturing = {"now": False}
    monkeypatch.setattr(triton_lowrank, "_capturing", lambda device: capturing["now"])
    model = torch.nn.Sequential(*(svdkern.LowRankLinear.from_factors(*make(1, 24, 20, 5, torch.float32, seed=s)[1:])
                                  for s in range(2)))
    x9, x1, x3 = (torch.randn(t, 24).to(DEVICE) for t in (9, 1, 3))
    capturing["now"] = True
    with pytest.raises(triton_lowrank.NotWarmedUpError, match=r"svdkern\.warm_up\(model, token_counts=\(9,\)\)"):
        model[0](x9)
    capturing["now"] = False
    assert svdkern.warm_up(model, token_counts=(9, 1)) == 2
    capturing["now"] = True
    with torch.no_grad():
        y9, y1 = model[1](x9), model[1](x1)  # warmed: the same kernels run inside capture
    layer = model[1]
    assert_within_torch_error(y9, x9, layer.U, layer.V, layer.bias)
    assert_within_torch_error(y1, x1, layer.U, layer.V, layer.bias)
    # 3 tokens share 9's token-count class but not its bucket's (4 vs 16, a multiple of 16)
    with pytest.raises(triton_lowrank.NotWarmedUpError, match=r"token_counts=\(3,\)"):
        model[1](x3)
    # 9 tokens again, but x no longer 16-byte aligned: Triton compiles another kernel for that
    misaligned = torch.randn(9, 25).to(DEVICE)[:, 1:]
    with pytest.raises(svdkern.NotWarmedUpError, match=r"token_counts=\(9,\)"):
        model[1](misaligned)
    with pytest.raises(ValueError, match="positive"):
        svdkern.warm_up(model, token_counts=(0,))


def test_smoke_direct_launches_pass_the_autotuners_options():
    """Smoke check, with a stand-in kernel (no compile cache is looked at): Triton keys compiled
    kernels on the launch options as passed, so a config launched directly (from the table, or
    autotuned before) must pass them as the autotuner did, or the kernel is compiled and loaded
    anew — inside CUDA-graph capture, where that is forbidden. The GPU capture test is the real check."""
    from svdkern.backends import lowrank_configs as lc

    seen = []

    class Kernel:  # stands in for the jitted kernel: records how the autotuner launches it
        arg_names = ["a", "HAS_BIAS"]
        fn = staticmethod(lambda a, HAS_BIAS: None)

        def run(self, *args, **kwargs):
            seen.append(kwargs)

    for regime in lc.REGIMES:
        cfg = triton_lowrank.candidates(regime)[0]
        meta, launch = lc.split_meta(cfg)
        triton.autotune([triton.Config(meta, **launch)], key=[])(Kernel()).run(1, HAS_BIAS=False)
        passed = {k: v for k, v in seen.pop().items() if k != "HAS_BIAS"}
        assert list(passed.items()) == list(triton_lowrank._as_autotuned(tuple(cfg.items())).items()), regime


def test_autotuning_times_short_and_tries_only_covering_tiles(monkeypatch):
    from svdkern.backends import lowrank_configs as lc

    monkeypatch.setenv("SVDKERN_AUTOTUNE_MS", "2,10")
    monkeypatch.setattr(triton_lowrank, "_tuned_kernels", {})
    seen = {}
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, warmup, rep, quantiles: seen.update(warmup=warmup, rep=rep) or [1.0] * 3)
    triton_lowrank._autotuner("prefill").do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8))
    assert seen == {"warmup": 2.0, "rep": 10.0}
    monkeypatch.setenv("SVDKERN_AUTOTUNE_MS", "2")
    with pytest.raises(ValueError, match="WARMUP,REP"):
        lc.autotune_ms()
    # a 45 x 67 GEMM at bucket 32: no tile past the smallest that covers each dimension
    configs = triton_lowrank._CANDIDATES["prefill"]
    kept = triton_lowrank._covering_tiles(configs, {"M_BUCKET": 32, "N": 45, "K": 67})
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept} == {(64, 64, 64)}
    big = triton_lowrank._covering_tiles(configs, {"M_BUCKET": 2048, "N": 4096, "K": 1229})
    assert big == configs  # LLaMA-7B's shapes keep every candidate


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_launches_on_the_inputs_device():
    x, U, V, b = (t.to("cuda:1") for t in make(5, 96, 80, 24, torch.float16))
    with torch.cuda.device(0):
        y = triton_lowrank.lowrank_linear(x, U, V, b)
    assert y.device == x.device
    assert_within_torch_error(y, x, U, V, b)
