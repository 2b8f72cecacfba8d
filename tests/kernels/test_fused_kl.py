"""Fused linear + KL / CE: values and gradients against float64 autograd of full logits.

Sizes are awkward on purpose: V not a multiple of any tile (257, 1000, 300), H not a multiple of
BLOCK_H (40), a single token, chunk sizes that split T unevenly, padded rows with NaN states.
"""

import math

import pytest
import torch

import orthrus_kernels
from orthrus_kernels import (
    chunked_linear_ce_reference,
    chunked_linear_kl_reference,
    fused_linear_ce,
    fused_linear_kl,
)
from orthrus_kernels._backend import HAS_TRITON, interpreting

TRITON_OK = HAS_TRITON and (interpreting() or torch.cuda.is_available())
# Interpreter-built kernels take CPU tensors; GPU-built ones run on CUDA.
DEV = torch.device("cuda" if (TRITON_OK and not interpreting()) else "cpu")
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no triton backend here")),
]


def _to_dev(backend, x):
    return x.to(DEV) if (backend == "triton" and isinstance(x, torch.Tensor)) else x


def kl(hs, ht, w, *args, backend, **kw):
    """fused_linear_kl on the backend's device; outputs come back to the CPU (autograd too)."""
    kw = {k: _to_dev(backend, v) for k, v in kw.items()}
    out = fused_linear_kl(_to_dev(backend, hs), _to_dev(backend, ht), _to_dev(backend, w), *args,
                          backend=backend, **kw)
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


def ce(hs, w, tgt, *args, backend, **kw):
    kw = {k: _to_dev(backend, v) for k, v in kw.items()}
    out = fused_linear_ce(_to_dev(backend, hs), _to_dev(backend, w), _to_dev(backend, tgt), *args,
                          backend=backend, **kw)
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


def naive_kl(hs, ht, w, temperature=1.0):
    """The textbook formula on full float64 logits."""
    s = (hs.double() @ w.double().T) / temperature
    t = (ht.double() @ w.double().T) / temperature
    log_pt = torch.log_softmax(t, -1)
    return (log_pt.exp() * (log_pt - torch.log_softmax(s, -1))).sum(-1)


def naive_ce(hs, w, tgt, ignore_index=-100):
    s = hs.double() @ w.double().T
    return torch.nn.functional.cross_entropy(s, tgt, ignore_index=ignore_index, reduction="none")


def _grad64(fn, hs, g):
    h = hs.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(fn(h), h, g.double())
    return gr


def _rel_err(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def _data(T, H, V, seed, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(T, H, generator=g)
    ht = hs + 0.7 * torch.randn(T, H, generator=g)  # teacher close to student, as in training
    w = torch.randn(V, H, generator=g) * scale
    return hs, ht, w, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "T,H,V,temperature,chunk,precompute",
    [(37, 40, 257, 1.0, 16, False), (1, 16, 1000, 2.0, None, True), (9, 32, 130, 0.7, 4, True)],
)
def test_kl_matches_float64_full_logits(backend, T, H, V, temperature, chunk, precompute):
    hs, ht, w, g = _data(T, H, V, seed=T * 1000 + V)
    hs.requires_grad_()
    out = kl(hs, ht, w, temperature, chunk_size=chunk, precompute_grad=precompute, backend=backend)
    ref = naive_kl(hs.detach(), ht, w, temperature)
    assert out.shape == (T,) and out.dtype == torch.float32
    assert ref.abs().max() > 1e-2  # the comparison is not between near-zeros
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)

    go = torch.randn(T, generator=g)  # per-token upstream grads, not just ones
    (gh,) = torch.autograd.grad(out, hs, go)
    gr = _grad64(lambda h: naive_kl(h, ht, w, temperature), hs, go)
    assert _rel_err(gh, gr) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_matches_float64_with_ignored_rows(backend):
    T, H, V = 23, 40, 257
    hs, _, w, g = _data(T, H, V, seed=5)
    tgt = torch.randint(0, V, (T,), generator=g)
    tgt[[0, 7, 22]] = -100
    tgt[3] = V - 1  # last vocab column lives in the partial tile
    hs.requires_grad_()
    out = ce(hs, w, tgt, chunk_size=8, precompute_grad=False, backend=backend)
    ref = naive_ce(hs.detach(), w, tgt)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    assert torch.all(out[[0, 7, 22]] == 0)

    go = torch.randn(T, generator=g)
    (gh,) = torch.autograd.grad(out, hs, go)
    gr = _grad64(lambda h: naive_ce(h, w, tgt), hs, go)
    assert _rel_err(gh, gr) < 1e-4
    assert torch.all(gh[[0, 7, 22]] == 0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaNs
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_weight_padding_rows_are_exact_zero_even_if_nan(backend):
    T, H, V = 12, 32, 200
    hs, ht, w, g = _data(T, H, V, seed=11)
    pad = torch.tensor([2, 9, 11])
    hs[pad] = float("nan")  # garbage in padding must not leak into loss or grad
    ht[pad] = float("inf")
    tw = torch.rand(T, generator=g) + 0.5
    tw[pad] = 0.0
    hs.requires_grad_()
    out = kl(hs, ht, w, token_weight=tw, backend=backend)
    keep = tw != 0
    assert torch.all(out[pad] == 0)
    ref = naive_kl(hs.detach()[keep], ht[keep], w) * tw[keep].double()
    torch.testing.assert_close(out[keep].double(), ref, atol=2e-5, rtol=1e-4)
    (gh,) = torch.autograd.grad(out.sum(), hs)
    assert torch.isfinite(gh).all()
    assert torch.all(gh[pad] == 0)
    gr = _grad64(lambda h: naive_kl(h, ht[keep], w) * tw[keep].double(), hs[keep], torch.ones(int(keep.sum())))
    assert _rel_err(gh[keep], gr) < 1e-4

    tgt = torch.randint(0, V, (T,), generator=g)
    out_ce = ce(hs, w, tgt, token_weight=tw, backend=backend)
    assert torch.all(out_ce[pad] == 0) and torch.isfinite(out_ce).all()
    ref_ce = naive_ce(hs.detach()[keep], w, tgt[keep]) * tw[keep].double()
    torch.testing.assert_close(out_ce[keep].double(), ref_ce, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shape_and_identical_distributions(backend):
    B, L, H, V = 2, 3, 16, 70
    hs, _, w, _ = _data(B * L, H, V, seed=3)
    hs = hs.reshape(B, L, H)
    out = kl(hs, hs.clone(), w, backend=backend)
    assert out.shape == (B, L)
    # KL(p || p) = 0 up to fp32 cancellation between the log-sum-exp terms.
    assert out.abs().max() < 1e-5


@pytest.mark.skipif(not TRITON_OK, reason="no triton backend here")
def test_triton_low_precision_weights():
    """bf16/fp16 weights: fp32 accumulation, so only the input rounding and the low-precision
    gradient buffer separate the kernel from float64 math on the same rounded values."""
    T, H, V = 20, 48, 300
    for dt, tol in [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)]:
        hs, ht, w, g = _data(T, H, V, seed=17)
        hs, ht, w = hs.to(dt).requires_grad_(), ht.to(dt), w.to(dt)
        out = kl(hs, ht, w, backend="triton")
        ref = naive_kl(hs.detach(), ht, w)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
        (gh,) = torch.autograd.grad(out.sum(), hs)
        assert gh.dtype == dt
        gr = _grad64(lambda h: naive_kl(h, ht, w), hs, torch.ones(T))
        assert _rel_err(gh, gr) < tol, dt


@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_grad_survives_weight_release(backend):
    """ZeRO-3 gathers the lm_head only around the loss call and frees it afterwards: with the
    default precompute_grad the backward must not read the weight (here: it is zeroed)."""
    hs, ht, w, g = _data(13, 32, 150, seed=21)
    hs.requires_grad_()
    w_live = _to_dev(backend, w.clone())
    out = kl(hs, ht, w_live, backend=backend)
    w_live.zero_()  # "re-partitioned"
    go = torch.randn(13, generator=g)
    (gh,) = torch.autograd.grad(out, hs, go)
    assert _rel_err(gh, _grad64(lambda h: naive_kl(h, ht, w), hs, go)) < 1e-4
    with torch.no_grad():  # eval: no gradient pass, same values
        torch.testing.assert_close(kl(hs, ht, w, backend=backend), out.detach())


def test_torch_backend_gradcheck_float64():
    """Real finite-difference gradcheck of the autograd.Function (torch backend, float64)."""
    hs, ht, w, g = _data(5, 6, 11, seed=1, scale=1.0)
    hs = hs.double().requires_grad_()
    ht, w = ht.double(), w.double()
    tw = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h: fused_linear_kl(h, ht, w, 1.3, token_weight=tw, chunk_size=2, backend="torch"), (hs,)
    )
    tgt = torch.tensor([3, -100, 10, 0, 7])
    assert torch.autograd.gradcheck(
        lambda h: fused_linear_ce(h, w, tgt, chunk_size=3, backend="torch"), (hs,)
    )
    assert torch.autograd.gradcheck(
        lambda h: fused_linear_kl(h, ht, w, 0.8, precompute_grad=False, backend="torch"), (hs,)
    )


def test_chunked_reference_matches_float64():
    """The benchmark's fallback baseline must itself be right."""
    hs, ht, w, g = _data(11, 16, 90, seed=2)
    hs.requires_grad_()
    out = chunked_linear_kl_reference(hs, ht, w, chunk_size=4, temperature=1.5)
    torch.testing.assert_close(out.double(), naive_kl(hs.detach(), ht, w, 1.5), atol=2e-5, rtol=1e-4)
    (gh,) = torch.autograd.grad(out.sum(), hs)
    assert _rel_err(gh, _grad64(lambda h: naive_kl(h, ht, w, 1.5), hs, torch.ones(11))) < 1e-4
    tgt = torch.randint(0, 90, (11,), generator=g)
    tgt[4] = -100
    torch.testing.assert_close(
        chunked_linear_ce_reference(hs.detach(), w, tgt, chunk_size=4).double(), naive_ce(hs.detach(), w, tgt),
        atol=2e-5, rtol=1e-4,
    )


def test_lm_head_module_accepted_and_auto_backend():
    hs, ht, w, _ = _data(4, 8, 33, seed=9)
    lm_head = torch.nn.Linear(8, 33, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(w)
    out = fused_linear_kl(hs, ht, lm_head)  # backend="auto"
    torch.testing.assert_close(out.double(), naive_kl(hs, ht, w), atol=2e-5, rtol=1e-4)
    with pytest.raises(NotImplementedError):
        fused_linear_kl(hs, ht, torch.nn.Linear(8, 33, bias=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_for_project_chunked_distill(backend):
    """Same inputs, same per-token output (and argmaxes) as the project's torch loss path."""
    losses = pytest.importorskip("orthrus_train.losses")
    hs, ht, w, g = _data(21, 40, 257, seed=4)
    hs.requires_grad_()
    ref, ref_s, ref_t = losses.chunked_distill(hs, ht, w, kind="kl", chunk_size=8, temperature=1.3)
    out, s_arg, t_arg = kl(hs, ht, w, 1.3, return_argmax=True, backend=backend)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(s_arg, ref_s) and torch.equal(t_arg, ref_t)
    go = torch.randn(21, generator=g)
    (g_ref,) = torch.autograd.grad(ref, hs, go)
    (g_out,) = torch.autograd.grad(out, hs, go)
    assert _rel_err(g_out, g_ref) < 1e-4

    tgt = torch.randint(0, 257, (21,), generator=g)
    ref_ce, ref_s, _ = losses.chunked_distill(hs, None, w, kind="ce", targets=tgt, chunk_size=8)
    out_ce, s_arg = ce(hs, w, tgt, return_argmax=True, backend=backend)
    torch.testing.assert_close(out_ce, ref_ce, atol=2e-5, rtol=1e-4)
    assert torch.equal(s_arg, ref_s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tied", [(5, 70, 299), (100, 250), (63, 64), (250, 251, 299)])
def test_argmax_first_maximum_across_tiles_and_splits(backend, tied):
    """Ties resolve to the first index, like torch.argmax, even when the tied columns sit in
    different vocab tiles / splits (interpreter tiles are 64 wide, splits of 192 columns here),
    at any position inside a tile (the interpreter's logits must not depend on the host BLAS)."""
    T, H, V = 3, 16, 300
    hs, ht, w, _ = _data(T, H, V, seed=8)
    w[list(tied)] = w[0] * 0 + 4 * hs[0] / hs[0].norm()  # identical rows: exact ties for row 0
    out, s_arg, t_arg = kl(hs, ht, w, return_argmax=True, backend=backend)
    logits_s, logits_t = hs.double() @ w.double().T, ht.double() @ w.double().T
    assert s_arg[0].item() == tied[0] and logits_t[0].argmax().item() == tied[0]  # both rows tie
    assert torch.equal(s_arg, logits_s.argmax(-1))
    assert torch.equal(t_arg, logits_t.argmax(-1))


def test_backend_resolution(monkeypatch):
    x = torch.zeros(2, 2)
    rb = orthrus_kernels.resolve_backend
    assert rb("torch", x) == "torch"
    assert rb("auto", x.double(), triton_dtypes=(torch.float32,)) == "torch"
    with pytest.raises(ValueError):
        rb("cuda", x)
    # CPU tensors never go to Triton behind the caller's back: only while TRITON_INTERPRET is set
    # (this folder's fixture sets it when the kernels were built for the interpreter).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert rb("auto", x) == "torch"
    if interpreting():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert rb("auto", x) == "triton"
        assert rb("triton", x) == "triton"
    elif not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            rb("triton", x)
    assert math.isfinite(float(fused_linear_kl(x, x, torch.eye(2), backend="auto").sum()))
