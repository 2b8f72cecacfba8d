"""Counter-based uniforms for decoding: reproducible per row, drawn on the device, graph-safe.

Every random number the engine uses is a pure function of (row seed, row step counter, slot):
`u = H(seed, counter, slot)` where H is a chain of murmur3 `fmix32` finalizers, computed with int64
tensor arithmetic (no overflow: 32-bit words, 16-bit split multiplies). Consequences:

* a row's samples do not depend on which other rows share its batch, on the batch size, or on whether
  the step ran eagerly or as a CUDA graph replay (no generator state is advanced anywhere);
* nothing is drawn on the host, so a decode step never synchronizes;
* the same (seed, counter, slot) always gives the same number, on every device and torch version.

Slots: at verify pass `c` of a row, the draft samples use slots 0..K-2 and the acceptance rule slots
K-1..2K-2 (see `engine.py`).
"""
from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32, without int64 overflow: with c = ch * 2**16 + cl (host constants),
    x * c = x * cl + (x * ch) * 2**16, and only the low 16 bits of x * ch survive the shift (6 tensor ops;
    the same value as splitting x, which took 8)."""
    ch, cl = (c >> 16) & 0xFFFF, c & 0xFFFF
    return (x * cl + (((x * ch) & 0xFFFF) << 16)) & _M32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer (a bijection of [0, 2**32) with full avalanche)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    """Uniforms in (0, 1), float32, shape (B, n): slots offset..offset+n-1 of step `counters[b]` of row b.

    seeds, counters: (B,) int64 (any values; seeds use their low 64 bits, counters their low 32)."""
    return uniforms_from_hashes(seed_hash(seeds), counters, slot_hash(offset, n, seeds.device))


# The same function in three parts, so that a decode step (which draws with fixed seeds and slots, and a new
# counter) hashes only the counter: the seed part is computed once per prompt, the slot part once per engine.
def seed_hash(seeds: torch.Tensor) -> torch.Tensor:
    """(B,) the per-row part of `counter_uniforms` (depends on the seed only)."""
    seeds = seeds.long()
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    return fmix32(fmix32(lo ^ 0x6A09E667) ^ hi)


def slot_hash(offset: int, n: int, device=None) -> torch.Tensor:
    """(n,) the per-slot part of `counter_uniforms` (depends on the slots only)."""
    slots = torch.arange(offset, offset + n, device=device, dtype=torch.long)
    return fmix32(_mul32(slots, 0x9E3779B1) ^ 0x3C6EF372)


def uniforms_from_hashes(seed_h: torch.Tensor, counters: torch.Tensor, slot_h: torch.Tensor) -> torch.Tensor:
    """`counter_uniforms` from `seed_hash(seeds)` (B,), the counters (B,) and `slot_hash(offset, n)` (n,)."""
    h = fmix32(seed_h ^ (counters.long() & _M32))
    h = fmix32(h[:, None] ^ slot_h[None, :])
    h = fmix32(h ^ 0xBB67AE85)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def row_seed(*keys) -> int:
    """A 63-bit seed from any printable keys (base seed, benchmark name, prompt index, round...):
    stable across processes and machines (unlike Python's `hash`)."""
    digest = hashlib.sha256("\x1f".join(str(k) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
