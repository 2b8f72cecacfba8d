"""Decode attention "live" (orthrus_kernels.decode_attn): SDPA's result while reading only each row's live
cache length, and the engine's greedy tokens unchanged with it.

The kernel runs on a GPU, or on a CPU in the Triton interpreter (tests/model/triton_testlib.py).
"""
import pytest
import torch

from orthrus_train.model import layers, masks

kernels = pytest.importorskip("orthrus_kernels")
from orthrus_kernels import decode_attn  # noqa: E402
from tests.model.triton_testlib import (DEV, interpreter_and_restored, requires_triton,  # noqa: E402
                                         tiny_engine_tokens)

pytestmark = requires_triton


_setting = interpreter_and_restored(layers.decode_attention, layers.set_decode_attention)


def attend(impl, q, k, v, mask, scale):
    layers.set_decode_attention(impl)
    dm = layers.DecodeMask(mask, q.shape[1], k.shape[1], q.dtype)
    assert dm.impl == impl
    return layers.cached_attention(q, k, v, dm, scale), dm


def qkv(B, hq, hkv, T, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, T, D, generator=g)
    k, v = torch.randn(B, hkv, S, D, generator=g), torch.randn(B, hkv, S, D, generator=g)
    return (x.to(DEV, dtype) for x in (q, k, v))


TOL = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_live_matches_sdpa(hq, hkv, T, dtype):
    """The real mask builders, ragged rows: an empty prefix (only the T new slots), a middle length, and a row
    whose length fills the cache (its last query sees slot S-1); D = 64, plain and grouped heads."""
    B, S, D = 3, 150, 64
    q, k, v = qkv(B, hq, hkv, T, S, D, dtype)
    lengths = torch.tensor([0, 70, S - T], device=DEV)
    for mask in (masks.cached_causal_mask(lengths, S, T), masks.draft_cached_mask(lengths, S, T)):
        ref, _ = attend("sdpa", q, k, v, mask, 0.125)
        out, dm = attend("live", q, k, v, mask, 0.125)
        assert dm.kv_len.tolist() == (lengths + T).tolist()
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, **TOL[dtype])


def test_live_head_dim_128_float16_and_prefill_bound():
    """D = 128 in float16, g*T over one query tile (g = 8, T = 17: 136 folded rows, two tiles); T = 64 is the
    largest "live" pass, more queries (prefill) go to SDPA."""
    B, S, D, hq, hkv, T = 2, 100, 128, 16, 2, 17
    q, k, v = qkv(B, hq, hkv, T, S, D, torch.float16, seed=1)
    mask = masks.cached_causal_mask(torch.tensor([5, 60], device=DEV), S, T)
    ref, _ = attend("sdpa", q, k, v, mask, D ** -0.5)
    out, _ = attend("live", q, k, v, mask, D ** -0.5)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])
    layers.set_decode_attention("live")
    long_mask = masks.cached_causal_mask(torch.tensor([0, 0], device=DEV), S, layers.DECODE_MAX_QUERIES + 1)
    assert layers.DecodeMask(long_mask, hq, hkv, torch.float16).impl == "sdpa"


@pytest.mark.parametrize("hq,hkv,T", [(4, 4, 1), (6, 2, 17)])
def test_live_never_reads_past_kv_len(hq, hkv, T):
    """Cache slots at or past a row's live length hold NaN: the output is finite and equals SDPA's on clean K/V
    (a masked-out NaN key would still poison a dot product, so this fails if the kernel loaded one)."""
    B, S, D = 3, 150, 64
    q, k, v = qkv(B, hq, hkv, T, S, D, torch.float32, seed=2)
    lengths = torch.tensor([0, 70, S - T], device=DEV)
    for mask in (masks.cached_causal_mask(lengths, S, T), masks.draft_cached_mask(lengths, S, T)):
        ref, _ = attend("sdpa", q, k, v, mask, 0.125)
        kv_len = decode_attn.live_lengths(mask)
        past = torch.arange(S, device=DEV)[None, None, :, None] >= kv_len[:, None, None, None]
        kn, vn = k.masked_fill(past, float("nan")), v.masked_fill(past, float("nan"))
        assert kn[0].isnan().any() and kn[1].isnan().any() and not kn[2].isnan().any()
        out, _ = attend("live", q, kn, vn, mask, 0.125)
        assert out.isfinite().all()
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_live_fully_masked_queries_and_holes_match_sdpa():
    """Masks the engine never builds: a row attending nothing (kv_len 0), a query attending nothing next to
    one that does, holes inside the live range. SDPA returns 0 for a fully masked query; so does "live"."""
    B, hq, hkv, T, S, D = 3, 4, 2, 3, 90, 64
    q, k, v = qkv(B, hq, hkv, T, S, D, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(B, 1, T, S, generator=g) < 0.3).to(DEV)
    mask[0] = False
    mask[1, :, 0] = False
    mask[2, :, :, 70:] = False
    ref, _ = attend("sdpa", q, k, v, mask, 0.125)
    out, dm = attend("live", q, k, v, mask, 0.125)
    assert dm.kv_len[0].item() == 0 and dm.kv_len[2].item() <= 70
    assert (ref[0] == 0).all() and (ref[1, :, 0] == 0).all()  # the reference's convention, checked
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_live_refusals(monkeypatch):
    """Head dims other than 64 and 128 are refused with a clear error, and "auto" does not pick "live" for them;
    where the kernel cannot run (CPU tensors without TRITON_INTERPRET) requesting it raises, one line, no fallback."""
    q, k, v = qkv(1, 2, 1, 2, 40, 96, torch.float32)
    mask = masks.cached_causal_mask(torch.tensor([3], device=DEV), 40, 2)
    with pytest.raises(ValueError, match="head_dim"):
        attend("live", q, k, v, mask, 0.1)
    layers.set_decode_attention("auto")
    assert layers.DecodeMask(mask, 2, 1, torch.float32, 96).impl != "live"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layers.set_decode_attention("live")
    with pytest.raises(RuntimeError, match="'live' cannot run here: .*TRITON_INTERPRET=1") as e:
        layers.DecodeMask(mask.cpu(), 2, 1, torch.float32)
    assert "\n" not in str(e.value)


def test_engine_greedy_tokens_unchanged_with_live(monkeypatch):
    """The engine's greedy drafted (and AR) decode of a tiny model with D = 64 and grouped heads gives the same
    tokens with "live" as with "sdpa", and the kernel really served its passes."""
    calls = []
    real = decode_attn.live_attention
    monkeypatch.setattr(decode_attn, "live_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    out, accepted, m = tiny_engine_tokens(layers.set_decode_attention, ("sdpa", "live"), 16)
    assert m.decoder.layers[0].self_attn.head_dim == 64
    assert out["live"] == out["sdpa"]
    assert all(len(t) == 16 for t in out["live"][0])
    assert max(accepted) > 0  # some drafts accepted: multi-token steps (cache lengths jump) are exercised
    assert 4 in calls and 1 in calls  # draft / verify blocks of K = 4, AR steps of 1 query


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_live_split_over_keys_matches_sdpa(splits, dtype):
    """The key axis split over several programs per (row, kv head, query tile) and merged (flash-decoding): SDPA's
    result for an empty prefix (most splits hold no key), a length shorter than one split's share, a middle one
    and a full cache; grouped heads, the AR (T = 1) and drafted (T = 17) shapes. Slots past each row's live
    length hold NaN, so a split that loaded one would poison the merge."""
    B, S, D, hq, hkv = 4, 300, 64, 6, 2
    for T in (1, 17):
        q, k, v = qkv(B, hq, hkv, T, S, D, dtype, seed=5 + T)
        lengths = torch.tensor([0, 20, 150, S - T], device=DEV)
        for mask in (masks.cached_causal_mask(lengths, S, T), masks.draft_cached_mask(lengths, S, T)):
            layers.set_decode_attention("sdpa")
            ref = layers.cached_attention(q, k, v, mask, 0.125)
            kv_len = decode_attn.live_lengths(mask)
            past = torch.arange(S, device=DEV)[None, None, :, None] >= kv_len[:, None, None, None]
            kn, vn = k.masked_fill(past, float("nan")), v.masked_fill(past, float("nan"))
            one = decode_attn.live_attention(q, kn, vn, mask, kv_len, 0.125, splits=1)
            out = decode_attn.live_attention(q, kn, vn, mask, kv_len, 0.125, splits=splits)
            assert out.isfinite().all() and out.shape == ref.shape and out.dtype == dtype
            torch.testing.assert_close(out, ref, **TOL[dtype])
            torch.testing.assert_close(out, one, **TOL[dtype])


def test_live_split_fully_masked_rows_are_zero():
    """A row attending nothing (kv_len 0) and a query attending nothing give 0 after the merge too."""
    B, hq, hkv, T, S, D = 2, 4, 2, 3, 200, 64
    q, k, v = qkv(B, hq, hkv, T, S, D, torch.float32, seed=9)
    mask = torch.zeros(B, 1, T, S, dtype=torch.bool, device=DEV)
    mask[1, :, 1:, :150] = True
    kv_len = decode_attn.live_lengths(mask)
    layers.set_decode_attention("sdpa")
    ref = layers.cached_attention(q, k, v, mask, 0.125)
    out = decode_attn.live_attention(q, k, v, mask, kv_len, 0.125, splits=4)
    assert (out[0] == 0).all() and (out[1, :, 0] == 0).all()
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="splits must be >= 1"):
        decode_attn.live_attention(q, k, v, mask, kv_len, 0.125, splits=0)


def test_num_splits_fills_small_grids_only(monkeypatch):
    """The split count: about PROGRAMS_PER_SM programs per SM for a small grid on a long cache (SmolLM2 at batch
    1 on an H200: 3 kv heads, one query tile), bounded by the cache length and MAX_SPLITS, rounded down to a power
    of two; 1 for a grid that already fills the GPU or a short cache."""
    monkeypatch.setattr(decode_attn, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert decode_attn.num_splits(3, 2048, cuda) == 2048 // decode_attn.MIN_SPLIT_KEYS == 16
    assert decode_attn.num_splits(3, 8192, cuda) == decode_attn.MAX_SPLITS == 32
    assert decode_attn.num_splits(3, 100, cuda) == 1
    assert decode_attn.num_splits(16 * 8, 8192, cuda) == 2  # ceil(264 / 128) = 3, rounded down
    assert decode_attn.num_splits(64 * 8, 8192, cuda) == 1
    # SmolLM2 (3 kv heads, one query tile) on a 768-slot cache: 6 by the cache, 4 taken (batch 1 and 16)
    assert decode_attn.num_splits(3, 768, cuda) == decode_attn.num_splits(48, 768, cuda) == 4
    assert decode_attn.num_splits(3, 1536, cuda) == 8 and decode_attn.num_splits(3, 1535, cuda) == 8


def test_engine_greedy_tokens_unchanged_with_split_live(monkeypatch):
    """The engine's greedy drafted and AR decode with the key axis split (forced by a small MIN_SPLIT_KEYS and a
    large PROGRAMS_PER_SM: every pass over a cache of 16 slots or more splits) gives the same tokens as SDPA."""
    chosen = []
    real = decode_attn.num_splits
    monkeypatch.setattr(decode_attn, "MIN_SPLIT_KEYS", 8)
    monkeypatch.setattr(decode_attn, "PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(decode_attn, "num_splits", lambda *a: chosen.append((a[1], real(*a))) or chosen[-1][1])
    out, accepted, _ = tiny_engine_tokens(layers.set_decode_attention, ("sdpa", "live"), 16)
    assert out["live"] == out["sdpa"]
    long_caches = [n for slots, n in chosen if slots >= 16]
    assert max(accepted) > 0 and len(long_caches) > 10 and min(long_caches) > 1


def test_auto_rule_takes_live_where_it_was_timed_faster():
    """"auto" gives a pass to "live" only where session 9 timed it faster: a CUDA device whose probe passed, head
    dims 64 / 128, batches up to LIVE_AUTO_MAX_BATCH, and not the single-query pass of one row (SDPA's AR step at
    batch 1 stayed faster at long prompts). Elsewhere the earlier rule: "fold" for batched blocks, else "sdpa"."""
    rule = layers.auto_decode_attention
    assert rule(16, 16, 64, True) == "live" and rule(16, 1, 128, True) == "live" and rule(1, 32, 128, True) == "live"
    assert rule(1, 1, 64, True) == "sdpa"
    assert rule(layers.LIVE_AUTO_MAX_BATCH + 1, 16, 64, True) == "fold"
    assert rule(16, 16, 96, True) == "fold" and rule(16, 16, None, True) == "fold"
    assert rule(16, 16, 64, False) == "fold" and rule(4, 1, 64, False) == "sdpa"
    # the rule offers "live" exactly the head dims the kernel accepts
    assert layers.LIVE_HEAD_DIMS == decode_attn.SUPPORTED_HEAD_DIMS
    assert all(rule(16, 16, d, True) == "live" for d in decode_attn.SUPPORTED_HEAD_DIMS)


def test_auto_never_live_off_cuda_and_engine_probes_it(monkeypatch):
    """On a CPU (even with the interpreter) "auto" never runs the live kernel, and never probes it; on CUDA the
    decision is the probe's, made once per device (a failed probe: SDPA with one warning)."""
    from tests.model.triton_testlib import assert_auto_falls_back

    layers.set_decode_attention("auto")
    monkeypatch.setattr(layers._ATTN_SWITCH, "probe", lambda d: pytest.fail("probed on a CPU"))
    mask = masks.draft_cached_mask(torch.tensor([3, 5]), 40, 4)
    assert layers.DecodeMask(mask, 4, 2, torch.float32, 64).impl == "fold"
    assert layers.live_attention_runs("cpu") is False
    assert_auto_falls_back(monkeypatch, "attention", layers._ATTN_SWITCH, layers.set_decode_attention,
                           lambda d: "triton" if layers.live_attention_runs(d) else "torch")


@pytest.mark.skipif(DEV.type != "cuda", reason="the probe runs the kernel on a CUDA device")
def test_live_probe_passes_on_cuda():
    layers.set_decode_attention("auto")
    layers._ATTN_SWITCH.runs.clear()
    assert layers.live_attention_runs(DEV)
    mask = masks.draft_cached_mask(torch.tensor([3, 5], device=DEV), 40, 4)
    assert layers.DecodeMask(mask, 4, 2, torch.bfloat16, 64).impl == "live"
