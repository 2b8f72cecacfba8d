"""Decode RMSNorm "triton" (orthrus_kernels.rmsnorm): `layers.rms_norm`'s result in one kernel (and, fused with the
residual add before it, `add_rms_norm`), and the engine's greedy tokens and the decode passes' hidden states
unchanged with it.

The kernel runs on a GPU, or on a CPU in the Triton interpreter (tests/model/triton_testlib.py).
"""
import sys

import pytest
import torch

from orthrus_train.errors import exc_line
from orthrus_train.model import layers

kernels = pytest.importorskip("orthrus_kernels")
from orthrus_kernels import rmsnorm  # noqa: E402
from tests.model.triton_testlib import (DEV, assert_auto_falls_back, interpreter_and_restored,  # noqa: E402
                                         requires_triton, tiny_engine_tokens)

pytestmark = requires_triton


_setting = interpreter_and_restored(layers.decode_norm, layers.set_decode_norm)


def inputs(x_shape, w_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g) * 3
    w = 1 + 0.3 * torch.randn(w_shape, generator=g)
    return x.to(DEV, dtype), w.to(DEV, dtype)


CASES = [((3, 576), (576,)), ((2, 5, 64), (5, 64)), ((2, 5, 64), (64,)), ((3, 30, 64), (30, 64)), ((2, 4096), (4096,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_shape,w_shape", CASES)
def test_kernel_matches_rms_norm(x_shape, w_shape, dtype):
    """Plain (N,) weights and per-head (H, N) rows (the joint q/k norm), N = 64, 576, 4096. float32: the same up to
    the order of the float32 sum of squares (an ulp of the row's rsqrt); 16-bit: within one rounding."""
    x, w = inputs(x_shape, w_shape, dtype)
    out, ref = rmsnorm.rms_norm(x, w, 1e-6), layers.rms_norm(x, w, 1e-6)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=4e-7)
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-5, rtol=1e-2)


ADD_SHAPES = [(2, 1, 64), (2, 17, 64), (3, 1, 576), (2, 17, 576), (3, 576)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ADD_SHAPES)
def test_fused_add_kernel_matches_eager(shape, dtype):
    """add_rms_norm(x, r) == eager (x + r, rms_norm(x + r)): the sum bit for bit (float32 add of the widened values,
    one rounding to x's dtype, as torch's add; exact ties included), and the norm bit for bit the plain kernel's
    of that rounded sum, hence compared with `layers.rms_norm` as the plain kernel is (float32: up to the order of
    the float32 sum of squares; 16-bit: within one rounding. Here fp16 (2, 17, 576) has one element one ulp off:
    the plain kernel's sum of squares of that row differs from torch's mean by an ulp)."""
    x, w = inputs(shape, shape[-1:], dtype)
    r = inputs(shape, shape[-1:], dtype, seed=1)[0] * 0.37
    if dtype != torch.float32:  # exact ties of x's dtype: rounding to nearest even, not truncation
        ulp = torch.finfo(dtype).eps
        x.view(-1)[:4] = torch.tensor([1.0, 1 + ulp, -1 - ulp, 2 + 2 * ulp], dtype=dtype)
        r.view(-1)[:4] = torch.tensor([ulp / 2, ulp / 2, -ulp / 2, ulp], dtype=dtype)
    s, y = rmsnorm.add_rms_norm(x, r, w, 1e-6)
    ref_s = x + r
    ref_y = layers.rms_norm(ref_s, w, 1e-6)
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == x.shape
    assert torch.equal(s, ref_s)
    assert torch.equal(y, rmsnorm.rms_norm(ref_s, w, 1e-6))  # the plain kernel's arithmetic on the rounded sum
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref_y, atol=1e-6, rtol=4e-7)
    else:
        torch.testing.assert_close(y.float(), ref_y.float(), atol=1e-5, rtol=1e-2)


def test_fused_add_kernel_strided_and_refusals():
    """Leading dims with any strides (a slice of a wider tensor), per-head (H, N) weights; r of another shape or
    dtype is refused."""
    g = torch.Generator().manual_seed(2)
    big = torch.randn(2, 6, 64, generator=g).to(DEV, torch.bfloat16)
    x, r = big[:, 1:4], torch.randn(2, 3, 64, generator=g).to(DEV, torch.bfloat16)
    w = torch.randn(3, 64, generator=g).to(DEV, torch.bfloat16)
    s, y = rmsnorm.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, x + r) and torch.equal(y, rmsnorm.rms_norm(x + r, w, 1e-6))
    with pytest.raises(ValueError, match="shape"):
        rmsnorm.add_rms_norm(x, r[:, :2], w, 1e-6)
    with pytest.raises(TypeError, match="dtype"):
        rmsnorm.add_rms_norm(x, r.float(), w, 1e-6)


def test_decode_add_rms_norm_dispatch(monkeypatch):
    """decode_add_rms_norm: r None -> (h, the norm); "torch" -> the eager add then `rms_norm` (bit-identical to the
    unfused formulation, no kernel); "triton" -> one add_rms_norm call; a module that is not an RMSNorm -> its own
    forward of the eager sum."""
    from orthrus_train.model import build_random, tiny_config

    mod = build_random(tiny_config("qwen3", vocab_size=64, layers=1), seed=0).model.norm
    with torch.no_grad():
        mod.weight.add_(0.3)
    h, r = (t[0] for t in (inputs((2, 3, 64), (64,), torch.bfloat16, seed=i) for i in (0, 1)))
    mod = mod.to(DEV, torch.bfloat16)
    calls = []
    real = rmsnorm.add_rms_norm
    monkeypatch.setattr(rmsnorm, "add_rms_norm", lambda *a: calls.append(1) or real(*a))
    layers.set_decode_norm("torch")
    s, y = layers.decode_add_rms_norm(mod, h, r)
    assert calls == [] and torch.equal(s, h + r) and torch.equal(y, layers.rms_norm(h + r, mod.weight, 1e-6))
    s, y = layers.decode_add_rms_norm(mod, h, None)
    assert s is h and torch.equal(y, layers.rms_norm(h, mod.weight, 1e-6))
    layers.set_decode_norm("triton")
    s, y = layers.decode_add_rms_norm(mod, h, r)
    assert calls == [1] and torch.equal(s, h + r)
    assert torch.equal(y, rmsnorm.rms_norm(h + r, mod.weight, 1e-6))
    ln = torch.nn.LayerNorm(64).to(DEV, torch.bfloat16)
    s, y = layers.decode_add_rms_norm(ln, h, r)
    assert calls == [1] and torch.equal(y, ln(h + r))


def test_kernel_joint_qk_view_of_fused_projection():
    """The joint q/k norm's input: (B, T, Hq + Hkv, D), a view of the fused q/k/v output (rows not uniformly
    strided), with the per-head weight `project_qkv` builds (q_norm rows then k_norm rows)."""
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 64
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).to(DEV, torch.bfloat16)
    qk = qkv[..., :(Hq + Hkv) * D].view(B, T, Hq + Hkv, D)
    wq, wk = (torch.randn(D, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    w = torch.cat([wq.expand(Hq, D), wk.expand(Hkv, D)])
    out, ref = rmsnorm.rms_norm(qk, w, 1e-6), layers.rms_norm(qk, w, 1e-6)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-5, rtol=1e-2)


def test_switch_and_refusals(monkeypatch):
    """Unknown names are refused; where the kernel cannot run (CPU tensors without TRITON_INTERPRET) requesting
    "triton" raises one line, no fallback; "torch" never touches the kernel."""
    with pytest.raises(ValueError, match="decode norm must be one of"):
        layers.set_decode_norm("fused")
    x, w = inputs((2, 64), (64,), torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layers.set_decode_norm("torch")
    torch.testing.assert_close(layers.decode_rms_norm(x.cpu(), w.cpu(), 1e-6), layers.rms_norm(x.cpu(), w.cpu(), 1e-6))
    layers.set_decode_norm("triton")
    with pytest.raises(RuntimeError, match="'triton' cannot run here: .*TRITON_INTERPRET=1") as e:
        layers.decode_rms_norm(x.cpu(), w.cpu(), 1e-6)
    assert "\n" not in str(e.value)


def test_kernels_not_installed_says_to_install(monkeypatch):
    """A checkout on PYTHONPATH without `pip install -e .` has no orthrus_kernels (setup maps kernels/ to it):
    asking for a kernel says to install the project, in one line that keeps the fix inside the 200 characters a
    fallback warning quotes (session 10 profiled torch fallbacks on a GPU this way)."""
    x, w = inputs((2, 64), (64,), torch.float32)
    for name in ("orthrus_kernels", "orthrus_kernels._backend", "orthrus_kernels.rmsnorm"):
        monkeypatch.setitem(sys.modules, name, None)  # as if never installed: importing them raises ImportError
    monkeypatch.setattr(layers, "_KERNEL_MODULES", {})
    prev = layers.decode_norm()
    layers.set_decode_norm("triton")
    try:
        with pytest.raises(RuntimeError, match=r"install the project \(`pip install -e \.`\)") as e:
            layers.decode_rms_norm(x.cpu(), w.cpu(), 1e-6)
    finally:
        layers.set_decode_norm(prev)
    msg = str(e.value)
    assert "\n" not in msg and "ORTHRUS_DECODE_NORM=torch" in msg
    assert "pip install -e ." in exc_line(e.value, 200)


def test_auto_takes_the_kernel_on_cuda_only(monkeypatch):
    """The default "auto" runs the one-kernel norm where it was measured faster (a CUDA device with Triton) and
    the torch norm elsewhere, never the CPU interpreter; the eval report names what ran (resolved_decode_norm)."""
    assert layers.DECODE_NORM_CHOICES[0] == "auto"
    calls = []
    real = rmsnorm.rms_norm
    monkeypatch.setattr(rmsnorm, "rms_norm", lambda x, w, eps: calls.append(x.device.type) or real(x, w, eps))
    layers.set_decode_norm("auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w = inputs((2, 64), (64,), torch.float32)
    out = layers.decode_rms_norm(x.cpu(), w.cpu(), 1e-6)
    assert calls == [] and layers.resolved_decode_norm("cpu") == "torch"
    torch.testing.assert_close(out, layers.rms_norm(x.cpu(), w.cpu(), 1e-6))
    if DEV.type == "cuda":  # resolving "auto" first probes the kernels on the device (their calls not counted)
        assert layers.resolved_decode_norm(DEV) == "triton"
        calls.clear()
        layers.decode_rms_norm(x, w, 1e-6)
        assert calls == ["cuda"]
    layers.set_decode_norm("torch")
    assert layers.resolved_decode_norm(DEV) == "torch"


def test_engine_greedy_tokens_unchanged_with_triton_norm(monkeypatch):
    """The engine's greedy drafted and AR decode of a tiny Qwen3 (q/k norms: the joint norm is exercised) in float32
    gives the same tokens with "triton" as with "torch", and the kernels really served the passes' norms: per pass
    the first layer's input norm alone is the plain kernel; every other layer norm, and the final norm, takes its
    residual add along (add_rms_norm: 2 per layer)."""
    calls, add_calls = [], []
    real, real_add = rmsnorm.rms_norm, rmsnorm.add_rms_norm
    monkeypatch.setattr(rmsnorm, "rms_norm", lambda x, w, eps: calls.append(tuple(w.shape)) or real(x, w, eps))
    monkeypatch.setattr(rmsnorm, "add_rms_norm",
                        lambda x, r, w, eps: add_calls.append(tuple(w.shape)) or real_add(x, r, w, eps))
    out, accepted, m = tiny_engine_tokens(layers.set_decode_norm, ("torch", "triton"), 12)
    assert out["triton"] == out["torch"]
    assert all(len(t) == 12 for t in out["triton"][0])
    assert max(accepted) > 0  # some drafts accepted: multi-token steps are exercised
    D = m.decoder.layers[0].self_attn.head_dim
    assert (256,) in calls and (4 + 2, D) in calls  # the first layer's input norm and the joint q/k norm
    passes = calls.count((256,))
    assert add_calls and set(add_calls) == {(256,)}
    assert len(add_calls) == 2 * len(m.decoder.layers) * passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_passes_bit_identical_to_unfused_layer_steps(dtype):
    """The decode passes (prefill / verify "ar", draft "diff") with the pending residual carried into the next norm
    give, with "torch", the hidden states of the unfused formulation (`layer_step(decode=True)` per layer, then the
    final norm) bit for bit; with "triton" in bf16 on the CPU interpreter too (the 16-bit kernels are bit-identical
    there), in float32 up to the order of the float32 sum of squares."""
    from orthrus_train.model import OrthrusModel, build_random, masks, tiny_config

    bb = build_random(tiny_config("qwen3", vocab_size=128, hidden_size=128, layers=3, initializer_range=0.2), seed=0)
    m = OrthrusModel(bb, block_size=4, vocab_len=120).to(DEV, dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():  # norms away from 1 and twins away from the AR weights
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p) * 0.05)
    cache = m.new_cache(2, 24)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 120, (2, 6), generator=g).to(DEV)

    def unfused(h, mask, view):
        T = h.shape[1]
        pos = cache.lengths[:, None] + torch.arange(T, device=h.device)[None]
        cos, sin = m.rope(h, pos)
        idx = cache.write_index(T)
        dm = layers.DecodeMask(mask, m.config.num_attention_heads, m.config.num_key_value_heads, h.dtype)
        for i, layer in enumerate(m.decoder.layers):
            def attend(q, k, v, i=i, layer=layer):
                cache.write(i, k, v, idx)
                return layers.cached_attention(q, cache.k[i].to(q.dtype), cache.v[i].to(q.dtype), dm,
                                               layer.self_attn.scaling)
            h = layers.layer_step(layer, h, cos, sin, view, attend, decode=True)
        return layers.norm(m.decoder.norm, h, fast=True)

    with torch.no_grad():
        layers.set_decode_norm("torch")
        ref_prefill = unfused(m.embed(prompt), masks.cached_causal_mask(cache.lengths, cache.slots, 6), "ar")
        cache.lengths += 6
        block = torch.randint(0, 120, (2, 4), generator=g).to(DEV)
        ref = {"ar": unfused(m.embed(block), masks.cached_causal_mask(cache.lengths, cache.slots, 4), "ar"),
               "diff": unfused(m.embed(block), masks.draft_cached_mask(cache.lengths, cache.slots, 4), "diff")}
        for impl in ("torch", "triton"):
            layers.set_decode_norm(impl)
            cache.lengths -= 6
            prefill = m.ar_cached(prompt, cache)
            cache.lengths += 6
            got = {"ar": m.ar_cached(block, cache), "diff": m.draft(block, cache)}
            exact = impl == "torch" or (dtype == torch.bfloat16 and DEV.type == "cpu")
            for a, b in ((prefill, ref_prefill), (got["ar"], ref["ar"]), (got["diff"], ref["diff"])):
                if exact:
                    assert torch.equal(a, b), impl
                else:
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-2 if dtype != torch.float32 else 1e-4)


def test_auto_falls_back_to_torch_where_the_kernels_fail(monkeypatch):
    """"auto" on a CUDA device whose Triton cannot run the norm kernels: the torch norm, one warning, once."""
    assert_auto_falls_back(monkeypatch, "norm", layers._NORM_SWITCH, layers.set_decode_norm,
                           layers.resolved_decode_norm)


def test_the_probe_checks_the_kernels_arithmetic(monkeypatch):
    """The probe behind "auto" passes the real kernels (here on DEV: the GPU, or the CPU interpreter) and
    refuses kernels that run but compute something else."""
    layers._probe_norm_kernels(DEV)
    real = rmsnorm.add_rms_norm

    def off_by_one(x, r, w, eps):
        s, y = real(x, r, w, eps)
        return s, y + 1
    monkeypatch.setattr(rmsnorm, "add_rms_norm", off_by_one)
    with pytest.raises(AssertionError):
        layers._probe_norm_kernels(DEV)
