"""Decode K/V write "triton" (orthrus_kernels.rope.rope_kv_write): the RoPE kernel also stores the rotated k heads
and v into the layer's static cache slots, one launch instead of the RoPE's and two scatter_. The same cache
contents and attention inputs, bit for bit, as the unfused "triton" path (RoPE kernel, then `LayerSlots.write`),
and the engine's greedy tokens unchanged.

The kernel runs on a GPU, or on a CPU in the Triton interpreter (tests/model/triton_testlib.py).
"""
import pytest
import torch

from orthrus_train.model import layers
from orthrus_train.model.cache import LayerSlots, StaticKVCache

kernels = pytest.importorskip("orthrus_kernels")
from orthrus_kernels import rope  # noqa: E402
from tests.model.test_decode_rope import joint_qk  # noqa: E402
from tests.model.triton_testlib import (DEV, assert_auto_falls_back, interpreter_and_restored,  # noqa: E402
                                         requires_triton, tiny_engine_tokens)

pytestmark = requires_triton

_SETTINGS = ((layers.decode_rope, layers.set_decode_rope), (layers.decode_kv_write, layers.set_decode_kv_write),
             (layers.decode_norm, layers.set_decode_norm),
             (lambda: layers.QK_NORM_IN_ROPE, layers.set_decode_qk_norm_in_rope))
_setting = interpreter_and_restored(lambda: [get() for get, _ in _SETTINGS],
                                    lambda prev: [set_(p) for (_, set_), p in zip(_SETTINGS, prev)])


def decode_inputs(B, T, Hq, Hkv, D, S, lengths, dtype, seed=0):
    """The fused kernel's inputs as a decode pass has them: the joint q/k view and v of a fused q/k/v output, the
    `rope_tables` of a real rotary module, a cache of S slots holding random values (a stray write shows), and the
    write index of rows at `lengths` (clamped to the last slot where lengths + t runs past it)."""
    x, cos, sin = joint_qk(B, T, Hq, Hkv, D, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    v = (torch.randn(B, T, Hkv, D, generator=g) * 3).to(DEV, dtype).transpose(1, 2)
    cache = StaticKVCache.allocate(1, B, Hkv, S, D, dtype=dtype, device=DEV)
    for c in (cache.k[0], cache.v[0]):
        c.copy_(torch.randn(c.shape, generator=g).to(c))
    cache.lengths.copy_(torch.tensor(lengths))
    return x, v, cos, sin, cache, cache.write_index(T)


def unfused(x, v, cos, sin, k_cache, v_cache, index, hq):
    """The unfused "triton" path: the RoPE kernel, then the two scatter_ of `LayerSlots.write`, run on CPU copies
    of the caches (returned): where positions clamp onto one slot, the CPU's scatter_ leaves the last position's
    values there, while CUDA's scatter_ leaves any one of them (seen on an H200); the kernel's rule is the
    CPU's."""
    out = rope.apply_rope(x, cos, sin)
    k_cpu, v_cpu = k_cache.cpu(), v_cache.cpu()
    LayerSlots(k_cpu, v_cpu, index.cpu()).write(out[:, hq:].cpu(), v.cpu())
    return out, k_cpu, v_cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (9, 3)])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_equals_rope_then_scatter(D, T, heads, dtype):
    """Rows at different lengths, one of them running past the last slot (positions clamped onto it, the slack slot
    `write_index` keeps): the returned q/k heads are `layers.apply_rope`'s bits in its layout, and both caches hold
    exactly what the RoPE kernel + scatter_ leave (every slot: nothing else written; the clamped slot holds the
    last position's k and v, as the CPU's scatter_ leaves it)."""
    Hq, Hkv = heads
    S = 10
    x, v, cos, sin, cache, index = decode_inputs(2, T, Hq, Hkv, D, S, [0, S - 2 if T > 1 else S - 1], dtype)
    assert index[1, 0, -1, 0] == S - 1 and (T == 1 or index[1, 0, -2, 0] == S - 1)  # the last slot, twice if T > 1
    ref, ref_k, ref_v = unfused(x, v, cos, sin, cache.k[0], cache.v[0], index, Hq)
    out = rope.rope_kv_write(x, v, cos, sin, cache.k[0], cache.v[0], index, Hq)
    assert out.stride() == ref.stride() and torch.equal(out, ref)
    assert torch.equal(out, layers.apply_rope(x, cos, sin))
    assert torch.equal(cache.k[0].cpu(), ref_k) and torch.equal(cache.v[0].cpu(), ref_v)
    assert torch.equal(cache.v[0][1, :, S - 1], v[1, :, -1])  # the last position's v in the clamped slot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (9, 3)])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_with_the_joint_qk_norm_equals_the_norm_kernel_then_rope(D, T, heads, dtype):
    """`norm_weight` (Qwen3's joint q/k norm inside the kernel): the q/k heads returned and the K/V written are those
    of the norm kernel followed by the RoPE kernel + scatter_: bit for bit in the interpreter (on a GPU within an
    ulp: the sum of squares may add in another order), and close to the eager norm + RoPE. v is written as it is."""
    from orthrus_kernels import rmsnorm

    Hq, Hkv = heads
    S = 10
    x, v, cos, sin, cache, index = decode_inputs(2, T, Hq, Hkv, D, S, [0, S - 2 if T > 1 else S - 1], dtype)
    g = torch.Generator().manual_seed(7)
    w = (1 + 0.2 * torch.randn(Hq + Hkv, D, generator=g)).to(DEV, dtype)
    normed = rmsnorm.rms_norm(x.transpose(1, 2), w, 1e-6).transpose(1, 2)
    ref, ref_k, ref_v = unfused(normed, v, cos, sin, cache.k[0], cache.v[0], index, Hq)
    out = rope.rope_kv_write(x, v, cos, sin, cache.k[0], cache.v[0], index, Hq, w, 1e-6)
    assert out.stride() == ref.stride()
    exact = DEV.type == "cpu"  # the interpreter: the same sums; a GPU may order the sum of squares otherwise
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(cache.k[0].cpu(), ref_k, **tol)
    assert torch.equal(cache.v[0].cpu(), ref_v)
    eager = layers.apply_rope(layers.rms_norm(x, w[:, None], 1e-6), cos, sin)
    torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=2e-2)
    assert not torch.equal(out, rope.apply_rope(x, cos, sin))  # the norm really ran (w is not all ones)


def test_kernel_other_layouts():
    """Contiguous x and v, tables of batch 1 broadcast over B, int32 slots, and cache views whose rows are not
    contiguous (a slice of a longer cache: the slots' stride is not S * D): the same bits as the unfused path."""
    B, T, Hq, Hkv, D, S = 3, 5, 4, 2, 64, 9
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, Hq + Hkv, T, D, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(B, Hkv, T, D, generator=g).to(DEV, torch.bfloat16)
    cos, sin = (torch.randn(1, 1, T, D, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    index = (torch.tensor([[0], [2], [4]]) + torch.arange(T))[:, None, :, None].to(DEV, torch.int32)
    big = [torch.randn(B, Hkv, S + 7, D, generator=g).to(DEV, torch.bfloat16) for _ in range(2)]
    ref_big = [c.clone() for c in big]
    ref, *ref_kv = unfused(x, v, cos, sin, ref_big[0][:, :, :S], ref_big[1][:, :, :S], index.long(), Hq)
    for c, r in zip(ref_big, ref_kv):
        c[:, :, :S].copy_(r)
    out = rope.rope_kv_write(x, v, cos, sin, big[0][:, :, :S], big[1][:, :, :S], index, Hq)
    assert out.stride() == ref.stride() and torch.equal(out, ref)
    assert torch.equal(big[0], ref_big[0]) and torch.equal(big[1], ref_big[1])


def test_kernel_refusals():
    """Inputs the kernel cannot serve are refused in one line naming the fix, before anything is written."""
    x, v, cos, sin, cache, index = decode_inputs(2, 3, 4, 2, 64, 8, [0, 2], torch.float32)
    k0 = cache.k[0].clone()
    bad = [
        (dict(k_cache=cache.k[0].to(torch.bfloat16)), TypeError, "k_cache dtype torch.bfloat16 must be x's dtype"),
        (dict(v_cache=cache.v[0].transpose(2, 3).contiguous().transpose(2, 3)), ValueError, "contiguous last dim"),
        (dict(index=index[:, :, :2]), ValueError, r"index must be \(2, 1, 3, 1\)"),
        (dict(v=v[:, :1]), ValueError, "v must be"),
        (dict(q_heads=6), ValueError, "q_heads must be in 1..5"),
        (dict(cos=cos[..., :32]), ValueError, "cos/sin must be"),
        (dict(norm_weight=torch.ones(6, 32, device=DEV)), ValueError, r"norm_weight must be \(Hq \+ Hkv, D\)"),
        (dict(norm_weight=torch.ones(6, 64, device=DEV, dtype=torch.bfloat16)), TypeError,
         "norm_weight dtype torch.bfloat16 must be x's dtype"),
    ]
    for change, err, msg in bad:
        args = dict(x=x, v=v, cos=cos, sin=sin, k_cache=cache.k[0], v_cache=cache.v[0], index=index, q_heads=4)
        args.update(change)
        with pytest.raises(err, match=msg) as e:
            rope.rope_kv_write(**args)
        assert "\n" not in str(e.value)
    assert torch.equal(cache.k[0], k0)


def _model(family, dtype, **extra):
    from orthrus_train.model import OrthrusModel, build_random, tiny_config

    bb = build_random(tiny_config(family, vocab_size=128, hidden_size=128, layers=2, heads=4, kv_heads=2,
                                  initializer_range=0.2, **extra), seed=0)
    m = OrthrusModel(bb, block_size=4, vocab_len=120).to(DEV, dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():  # norms away from 1 and twins away from the AR weights
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p) * 0.05)
    return m


def _passes(m, monkeypatch, cache_dtype=None):
    """A prefill (rows of 6 tokens), a verify and a draft pass of `m` with the current settings, the second row's
    block ending on the cache's last slot. Returns (hidden states, caches, the attention inputs every layer saw: q
    and the layer's cache K and V, cloned). No position clamps onto the slack slot here: where several do, CUDA's
    scatter_ leaves any one of them there (the kernel the last, test_kernel_equals_rope_then_scatter), and such a
    row's outputs are never used."""
    from orthrus_train.model import orthrus

    seen = []
    real = orthrus.cached_attention

    def spy(q, k, v, mask, scale):
        seen.append((q.clone(), q.stride(), k.clone(), v.clone()))
        return real(q, k, v, mask, scale)
    monkeypatch.setattr(orthrus, "cached_attention", spy)
    g = torch.Generator().manual_seed(5)
    cache = m.new_cache(2, 12, dtype=cache_dtype)
    with torch.no_grad():
        out = [m.ar_cached(torch.randint(0, 120, (2, 6), generator=g).to(DEV), cache)]
        cache.lengths += torch.tensor([6, 8], device=DEV)  # row 1: slots 8, 9, 10, 11 for a block of 4
        block = torch.randint(0, 120, (2, 4), generator=g).to(DEV)
        out += [m.ar_cached(block, cache), m.draft(block, cache)]
    monkeypatch.setattr(orthrus, "cached_attention", real)
    return out, cache.k + cache.v, seen


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_passes_bit_identical_with_the_fused_write(family, dtype, monkeypatch):
    """The decode passes (prefill, verify "ar", draft "diff"; Qwen3's joint q/k norm and Llama's none) with the
    "triton" RoPE: writing K/V in the RoPE kernel gives the same hidden states, caches and attention inputs (q, its
    strides, the cache K and V each layer attends) bit for bit as the RoPE kernel + scatter_, and the fused passes
    run no scatter_ and no separate RoPE kernel (one rope_kv_write per layer and pass)."""
    from orthrus_train.decode import opcount

    m = _model(family, dtype)
    layers.set_decode_rope("triton")
    res = {}
    for impl in ("torch", "triton"):
        layers.set_decode_kv_write(impl)
        with opcount.counting() as c:
            res[impl] = _passes(m, monkeypatch)
        res[impl] += (c.ops,)
    (out_t, caches_t, seen_t, ops_t), (out_f, caches_f, seen_f, ops_f) = res["torch"], res["triton"]
    assert all(torch.equal(a, b) for a, b in zip(out_f, out_t))
    assert all(torch.equal(a, b) for a, b in zip(caches_f, caches_t))
    assert len(seen_f) == len(seen_t) == 3 * len(m.decoder.layers)
    for (q1, s1, k1, v1), (q2, s2, k2, v2) in zip(seen_f, seen_t):
        assert s1 == s2 and torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    n = 3 * len(m.decoder.layers)  # layer passes
    assert ops_t["scatter_"] == 2 * n and ops_t["triton:_rope_kernel"] == n and ops_t["triton:_rope_kv_kernel"] == 0
    assert ops_f["scatter_"] == 0 and ops_f["triton:_rope_kernel"] == 0 and ops_f["triton:_rope_kv_kernel"] == n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_joint_qk_norm_runs_in_the_rope_kernel(dtype, monkeypatch):
    """Qwen3 decode passes with the "triton" norm, RoPE and K/V write: the joint q/k norm runs inside the RoPE + K/V
    write kernel (`QK_NORM_IN_ROPE`, the default): the same hidden states, caches and attention inputs bit for bit
    (the interpreter: the same sums) as with the norm kernel apart, and one norm kernel fewer per layer and pass.
    Off, or with the "torch" norm, the norm is not fused (the "torch" norm keeps its eager ops)."""
    from orthrus_train.decode import opcount

    assert layers.QK_NORM_IN_ROPE  # on by default
    m = _model("qwen3", dtype)
    for setting in (layers.set_decode_rope, layers.set_decode_kv_write, layers.set_decode_norm):
        setting("triton")
    res = {}
    for on in (False, True):
        layers.set_decode_qk_norm_in_rope(on)
        with opcount.counting() as c:
            res[on] = _passes(m, monkeypatch) + (c.ops,)
    (out_0, caches_0, seen_0, ops_0), (out_1, caches_1, seen_1, ops_1) = res[False], res[True]
    exact = DEV.type == "cpu"
    for a, b in zip(out_1 + caches_1 + [t for row in seen_1 for t in row if isinstance(t, torch.Tensor)],
                    out_0 + caches_0 + [t for row in seen_0 for t in row if isinstance(t, torch.Tensor)]):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    n = 3 * len(m.decoder.layers)  # layer passes
    assert ops_1["triton:_rope_kv_kernel"] == ops_0["triton:_rope_kv_kernel"] == n
    assert ops_0["triton:_rms_norm_kernel"] - ops_1["triton:_rms_norm_kernel"] == n
    # the "torch" norm: nothing fused (its eager ops kept), whatever the flag says
    layers.set_decode_norm("torch")
    calls = []
    real_kv = rope.rope_kv_write
    monkeypatch.setattr(rope, "rope_kv_write", lambda *a: calls.append(len(a)) or real_kv(*a))
    _passes(m, monkeypatch)
    assert calls and set(calls) == {8}  # no norm weight passed


def test_falls_back_where_the_fusion_cannot_apply(monkeypatch):
    """The K/V write stays the scatter_ (same results, the kernel not called) where the fused kernel does not apply:
    the decode RoPE "torch" (that setting wins: today's torch path whole), a cache in another dtype than the pass,
    q and k norms that cannot be joint (different eps), rotary tables narrower than the head (partial rotary)."""
    calls = []
    real = rope.rope_kv_write
    monkeypatch.setattr(rope, "rope_kv_write", lambda *a: calls.append(1) or real(*a))
    m = _model("qwen3", torch.bfloat16)
    layers.set_decode_kv_write("triton")
    layers.set_decode_rope("torch")
    assert layers.resolved_decode_kv_write(DEV) == "torch"
    ref = _passes(m, monkeypatch)
    layers.set_decode_rope("triton")
    assert layers.resolved_decode_kv_write(DEV) == "triton"
    got = _passes(m, monkeypatch)
    assert calls and all(torch.equal(a, b) for a, b in zip(got[0] + got[1], ref[0] + ref[1]))
    # a float32 cache under a bf16 model: the scatter_ (it converts), the same as with the kernel off
    calls.clear()
    got = _passes(m, monkeypatch, cache_dtype=torch.float32)
    layers.set_decode_kv_write("torch")
    want = _passes(m, monkeypatch, cache_dtype=torch.float32)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1]))
    # q/k norms of different eps: not joint, q and k normed and rotated apart; the write is the scatter_
    m2 = _model("qwen3", torch.float32)
    for layer in m2.decoder.layers:
        layer.self_attn.k_norm.variance_epsilon = layer.self_attn.k_norm_diff.variance_epsilon = 1e-5
    layers.set_decode_kv_write("triton")
    got = _passes(m2, monkeypatch)
    layers.set_decode_kv_write("torch")
    want = _passes(m2, monkeypatch)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1]))
    # partial rotary: tables narrower than the head are left to the unfused path
    layers.set_decode_kv_write("triton")
    x, v, cos, sin, cache, index = decode_inputs(1, 2, 4, 2, 64, 8, [0], torch.float32)
    slots = cache.layer_slots(0, index)
    assert layers._kv_write_kernels(x, v, cos, slots) is rope
    assert layers._kv_write_kernels(x, v, cos[..., :32], slots) is None


def test_switch_and_refusals(monkeypatch):
    """Unknown names are refused; "auto" is the default and resolves to "torch" on a CPU (never the interpreter);
    asked for by name where Triton cannot run (CPU tensors without TRITON_INTERPRET), a pass raises one line naming
    the setting that needs no Triton."""
    assert layers.DECODE_KV_WRITE_CHOICES == ("auto", "torch", "triton")
    with pytest.raises(ValueError, match="decode kv write must be one of"):
        layers.set_decode_kv_write("fused")
    layers.set_decode_kv_write("auto")
    layers.set_decode_rope("auto")
    assert layers.resolved_decode_kv_write("cpu") == "torch"
    x, v, cos, sin, cache, index = (t.cpu() if isinstance(t, torch.Tensor) else t
                                    for t in decode_inputs(1, 2, 4, 2, 64, 8, [0], torch.float32))
    cache = StaticKVCache([cache.k[0].cpu()], [cache.v[0].cpu()], cache.lengths.cpu())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layers.set_decode_rope("triton")
    layers.set_decode_kv_write("triton")
    with pytest.raises(RuntimeError, match="decode kv write 'triton' cannot run here: .*ORTHRUS_DECODE_KV_WRITE=torch") \
            as e:
        layers._kv_write_kernels(x, v, cos, cache.layer_slots(0, index))
    assert "\n" not in str(e.value)


def test_auto_falls_back_to_torch_where_the_kernel_fails(monkeypatch):
    """"auto" on a CUDA device whose Triton cannot run the fused kernel (the RoPE kernel set to "triton"): the
    scatter_ write, one warning, decided once per device."""
    layers.set_decode_rope("triton")
    assert_auto_falls_back(monkeypatch, "kv write", layers._KV_WRITE_SWITCH, layers.set_decode_kv_write,
                           layers.resolved_decode_kv_write)


def test_the_probe_checks_the_kernels_arithmetic(monkeypatch):
    """The probe behind "auto" passes the real kernel (on DEV) and refuses one that runs but writes something
    else (here: the v slots left unwritten)."""
    layers._probe_kv_write_kernel(DEV)

    def no_v(x, v, cos, sin, kc, vc, index, hq, *norm):
        return real(x, v, cos, sin, kc, vc.clone(), index, hq, *norm)
    monkeypatch.setattr(rope, "rope_kv_write", no_v)
    with pytest.raises(AssertionError):
        layers._probe_kv_write_kernel(DEV)

    def no_norm(x, v, cos, sin, kc, vc, index, hq, *norm):  # the norm weight ignored: refused too
        return real(x, v, cos, sin, kc, vc, index, hq)
    monkeypatch.setattr(rope, "rope_kv_write", no_norm)
    with pytest.raises(AssertionError):
        layers._probe_kv_write_kernel(DEV)


real = rope.rope_kv_write


def test_engine_greedy_tokens_unchanged_with_the_fused_write(monkeypatch):
    """The engine's greedy drafted and AR decode of a tiny Qwen3 in float32 (prompts of 1, 7 and 12 tokens: rows
    at different lengths) gives the same tokens with the K/V written by the RoPE kernel as with the scatter_, and
    the kernel really served the passes (the prefill, draft and verify passes of every layer)."""
    calls = []
    monkeypatch.setattr(rope, "rope_kv_write", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    layers.set_decode_rope("triton")
    out, accepted, m = tiny_engine_tokens(layers.set_decode_kv_write, ("torch", "triton"), 12)
    assert out["triton"] == out["torch"]
    assert all(len(t) == 12 for t in out["triton"][0])
    assert max(accepted) > 0  # some drafts accepted: multi-token steps are exercised
    assert {1, 4} <= set(calls)  # the AR step (T = 1) and the drafted step's passes (T = K = 4)


def test_engine_greedy_tokens_unchanged_with_the_qk_norm_in_the_rope_kernel(monkeypatch):
    """The same with the "triton" norm, RoPE and K/V write, the joint q/k norm in the RoPE kernel or apart: the
    same greedy tokens, and the fused variant really served the passes."""
    calls = []
    monkeypatch.setattr(rope, "rope_kv_write", lambda *a: calls.append(len(a)) or real(*a))
    for setting in (layers.set_decode_rope, layers.set_decode_kv_write, layers.set_decode_norm):
        setting("triton")
    out, accepted, m = tiny_engine_tokens(layers.set_decode_qk_norm_in_rope, (False, True), 12)
    assert out[True] == out[False]
    assert max(accepted) > 0
    assert set(calls) == {8, 10}  # apart (8 arguments), then with the norm weight and eps (10)
