"""Decode MLP "triton" (orthrus_kernels.swiglu.silu_mul): the SwiGLU product `F.silu(g) * u` of the decode passes'
fused gate/up output in one kernel, with torch's two roundings (silu in float32 rounded to the dtype, then the
product rounded again); and the engine's greedy tokens unchanged with every fused decode kernel on.

The kernel runs on a GPU, or on a CPU in the Triton interpreter (tests/model/triton_testlib.py). In the interpreter
exp is numpy's (torch's CPU silu uses Sleef's) and bfloat16 subnormals are widened wrongly (Triton 3.9's
interpreter): the CPU checks say where they allow for that; on a GPU every check is exact.
"""
import pytest
import torch
import torch.nn.functional as F

from orthrus_train.model import layers

kernels = pytest.importorskip("orthrus_kernels")
from orthrus_kernels import rmsnorm, rope, swiglu  # noqa: E402
from tests.model.triton_testlib import (DEV, assert_auto_falls_back, interpreter_and_restored,  # noqa: E402
                                         requires_triton, tiny_engine_tokens)

pytestmark = requires_triton

_SETTINGS = ((layers.decode_mlp, layers.set_decode_mlp), (layers.decode_norm, layers.set_decode_norm),
             (layers.decode_rope, layers.set_decode_rope), (layers.decode_kv_write, layers.set_decode_kv_write))
_setting = interpreter_and_restored(lambda: [get() for get, _ in _SETTINGS],
                                    lambda prev: [set_(p) for (_, set_), p in zip(_SETTINGS, prev)])
GPU = DEV.type == "cuda"


def every_gate(dtype, seed=0):
    """Every finite value of a 16-bit dtype as the gate half of a (rows, 2n) gate/up output (n = 255 or 248), the
    up half random of either sign; returns the two strided halves."""
    g = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    g = g[torch.isfinite(g)]
    g = g.view(-1, 255 if g.numel() % 255 == 0 else 248)
    u = torch.randn(g.shape, generator=torch.Generator().manual_seed(seed)) * 3
    gu = torch.cat([g, u.to(dtype)], -1).to(DEV)
    n = g.shape[1]
    return gu[:, :n], gu[:, n:]


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def test_kernel_bfloat16_every_gate_value_bit_identical():
    """bfloat16 (the decode dtype): `F.silu(g) * u` bit for bit for every finite gate value. On the CPU interpreter
    the values where a subnormal is involved (gate, silu or product: its widening of bfloat16 subnormals is wrong)
    are left out, and they are few; on a GPU none is."""
    g, u = every_gate(torch.bfloat16)
    out, want = swiglu.silu_mul(g, u), F.silu(g) * u
    assert out.shape == want.shape and out.is_contiguous()
    keep = torch.ones_like(g, dtype=torch.bool) if GPU else layers._no_subnormals(g, F.silu(g), want)
    assert keep.float().mean() > 0.99
    diff = (bits(out) != bits(want)) & keep
    assert not diff.any(), f"{int(diff.sum())} gate values differ, e.g. g={g[diff][:4].tolist()}"


def test_kernel_float16_every_gate_value():
    """float16: bit for bit on a GPU; on the CPU interpreter, whose exp is numpy's rather than torch's, at most a
    last-bit difference on a handful of gate values (3 of 63,488 when written)."""
    g, u = every_gate(torch.float16)
    out, want = swiglu.silu_mul(g, u), F.silu(g) * u
    silu_out = swiglu.silu_mul(g, torch.ones_like(u))  # the first rounding alone
    diff = bits(silu_out) != bits(F.silu(g))
    if GPU:
        assert not diff.any() and torch.equal(bits(out), bits(want))
    else:
        assert int(diff.sum()) <= 8
        assert (bits(silu_out).int() - bits(F.silu(g)).int()).abs().max() <= 1
        # where the silu agrees, the product (the second rounding) does too
        assert torch.equal(bits(out)[~diff], bits(want)[~diff])


def test_kernel_float32():
    """float32: bit for bit on a GPU; on the CPU interpreter within a few ulps (numpy's exp against torch's)."""
    g32 = torch.randn(64, 2 * 384, generator=torch.Generator().manual_seed(1)) * 6
    g32[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, -120.0, 1e-3, -1e-3, 40.0])
    gu = g32.to(DEV)
    g, u = gu[:, :384], gu[:, 384:]
    out, want = swiglu.silu_mul(g, u), F.silu(g) * u
    if GPU:
        assert torch.equal(out, want)
    else:
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-37)


@pytest.mark.parametrize("n", [100, 1536])
def test_kernel_decode_layouts(n):
    """The halves of the decode passes' gate/up output (B, T, 2n) (n = 1536: SmolLM2's width, two column blocks, the
    second one masked), contiguous and 1-D inputs: the same bits as eager, contiguous output."""
    gen = torch.Generator().manual_seed(n)
    gu = torch.randn(3, 5, 2 * n, generator=gen).to(DEV, torch.bfloat16)
    for g, u in ((gu[..., :n], gu[..., n:]), (gu[..., :n].contiguous(), gu[..., n:].contiguous()),
                 (gu[1, 2, :n], gu[0, 4, n:])):
        out, want = swiglu.silu_mul(g, u), F.silu(g) * u
        assert out.is_contiguous() and out.shape == want.shape and torch.equal(out, want)


def test_kernel_refusals():
    g = torch.randn(2, 8).to(DEV)
    with pytest.raises(TypeError, match="u dtype torch.bfloat16 must be g's dtype torch.float32"):
        swiglu.silu_mul(g, g.bfloat16())
    with pytest.raises(ValueError, match=r"one shape \(\.\.\., N\)"):
        swiglu.silu_mul(g, g[:, :4])
    with pytest.raises(TypeError, match="silu_mul kernel supports"):
        swiglu.silu_mul(g.double(), g.double())


def _layer(family, dtype, act=None):
    """A tiny decoder layer with its fused gate/up weight attached (`DecodeFusion`), inputs, and the fusion."""
    from types import SimpleNamespace

    from orthrus_train.model import build_random, tiny_config

    bb = build_random(tiny_config(family, vocab_size=64, layers=1, **({"hidden_act": act} if act else {})),
                      seed=0).to(DEV, dtype)
    fusion = layers.DecodeFusion(SimpleNamespace(decoder=bb.model))
    fusion.refresh()
    h = torch.randn(3, 4, bb.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
    return bb.model.layers[0], h, fusion


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_out_takes_the_kernel_for_silu_only(dtype, monkeypatch):
    """`mlp_out(decode=True)` with the fused gate/up projection and "triton": the kernel computes the product of a
    SiLU MLP (bfloat16: the torch path's bits; float32 on the CPU interpreter: within its exp's ulps); a GELU MLP,
    the unfused module (no fusion attached) and training (decode=False) never call it."""
    calls = []
    real = swiglu.silu_mul
    monkeypatch.setattr(swiglu, "silu_mul", lambda g, u: calls.append(g.shape) or real(g, u))
    layer, h, fusion = _layer("llama", dtype)
    with torch.no_grad(), fusion:
        layers.set_decode_mlp("torch")
        ref = layers.mlp_out(layer, h, decode=True)
        layers.set_decode_mlp("triton")
        got = layers.mlp_out(layer, h, decode=True)
        assert torch.equal(layers.mlp_out(layer, h), ref)  # training: the module
    assert calls == [(3, 4, layer.mlp.intermediate_size)]
    if dtype == torch.bfloat16 or GPU:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layers.mlp_out(layer, h, decode=True)  # no fusion attached: the module's own forward
    gelu, hg, fusion_g = _layer("llama", dtype, act="gelu")
    with torch.no_grad(), fusion_g:
        got = layers.mlp_out(gelu, hg, decode=True)
        layers.set_decode_mlp("torch")
        assert torch.equal(got, layers.mlp_out(gelu, hg, decode=True))
    assert len(calls) == 1
    assert layers.is_silu(layer.mlp.act_fn) and layers.is_silu(torch.nn.SiLU()) and layers.is_silu(F.silu)
    assert not layers.is_silu(gelu.mlp.act_fn)


def test_switch_and_refusals(monkeypatch):
    """Unknown names are refused; "auto" is the default and resolves to "torch" on a CPU (never the interpreter);
    asked for by name where Triton cannot run (CPU tensors without TRITON_INTERPRET) it raises one line naming the
    setting that needs no Triton."""
    assert layers.DECODE_MLP_CHOICES == ("auto", "torch", "triton")
    with pytest.raises(ValueError, match="decode mlp must be one of"):
        layers.set_decode_mlp("fused")
    layers.set_decode_mlp("auto")
    assert layers.resolved_decode_mlp("cpu") == "torch"
    layer, h, fusion = _layer("llama", torch.float32)
    layer, h = layer.cpu(), h.cpu()
    fusion.refresh()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layers.set_decode_mlp("triton")
    with torch.no_grad(), fusion, pytest.raises(RuntimeError, match="decode mlp 'triton' cannot run here: "
                                                                   ".*ORTHRUS_DECODE_MLP=torch") as e:
        layers.mlp_out(layer, h, decode=True)
    assert "\n" not in str(e.value)


def test_auto_falls_back_to_torch_where_the_kernel_fails(monkeypatch):
    """"auto" on a CUDA device whose Triton cannot run the kernel: `act_fn(g) * u`, one warning, once per device."""
    assert_auto_falls_back(monkeypatch, "mlp", layers._MLP_SWITCH, layers.set_decode_mlp,
                           layers.resolved_decode_mlp)


def test_the_probe_checks_the_kernels_arithmetic(monkeypatch):
    """The probe behind "auto" passes the real kernel (on DEV) and refuses one that runs but rounds otherwise (here:
    the silu not rounded to bfloat16 before the product, one rounding instead of torch's two)."""
    layers._probe_mlp_kernel(DEV)
    monkeypatch.setattr(swiglu, "silu_mul", lambda g, u: (F.silu(g.float()) * u.float()).to(g.dtype))
    with pytest.raises(AssertionError):
        layers._probe_mlp_kernel(DEV)


def test_engine_greedy_tokens_unchanged_with_every_fused_kernel(monkeypatch):
    """The engine's greedy drafted and AR decode of a tiny Qwen3 in float32 gives the same tokens with every fused
    decode kernel on (the RoPE writing the K/V cache, the SwiGLU product; with the Triton norm and RoPE they need;
    the joint q/k norm weight built once) as with the torch path, and the fused kernels really served the passes (no
    separate RoPE kernel then). (The fused K/V write against the unfused Triton RoPE: test_decode_kv_write.py.)"""
    calls = []
    for mod, name in ((rope, "apply_rope"), (rope, "rope_kv_write"), (swiglu, "silu_mul"), (rmsnorm, "rms_norm")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    configs = {"torch": ("torch", "torch", "torch", "torch"), "fused": ("triton", "triton", "triton", "triton")}
    ran, current = {}, []

    def select(config):  # the kernels the previous config ran, then this config's settings
        if current:
            ran[current.pop()] = set(calls)
        calls.clear()
        current.append(config)
        for set_, v in zip((layers.set_decode_norm, layers.set_decode_rope, layers.set_decode_kv_write,
                            layers.set_decode_mlp), configs[config]):
            set_(v)
    out, accepted, m = tiny_engine_tokens(select, tuple(configs), 10)
    ran[current.pop()] = set(calls)
    assert out["fused"] == out["torch"]
    assert all(len(t) == 10 for t in out["fused"][0])
    assert max(accepted) > 0  # some drafts accepted: multi-token steps are exercised
    assert ran["torch"] == set()
    assert ran["fused"] == {"rope_kv_write", "silu_mul", "rms_norm"}
