"""Speculative decoding engine: Orthrus / Medusa drafts verified by the frozen backbone, and the plain
AR baseline, on one static KV cache with fixed shapes.

One step of a row whose newest committed token is x_a (cache holds positions < a):

  propose  draft logits (B, K-1, V) = model.propose(cache, x_a, last_hidden); drafts d_1..d_{K-1}
           are sampled from them (argmax at temperature 0) with the row's counter-based uniforms;
  verify   one AR pass over [x_a, d_1..d_{K-1}] at positions a..a+K-1 (writes its K/V to the cache);
           the acceptance rule (`decode/verify.py`, the one place it lives) returns m accepted drafts
           and the next token; the row emits d_1..d_m and the next token (m+1 tokens), its cache
           length becomes a+m+1, the next token is the new x_a and last_hidden = verify hidden[m].

The AR baseline is the same verify step with T=1 (no drafts): one token per backbone pass. Prefill
writes the prompt minus its last token, so that every emitted token, the first one included, comes
from a verify pass (acceptance length and TPF count every token; the AR baseline scores exactly 1).

Rows stop at an end-of-sequence token (emitted, then frozen) or at `max_new_tokens`. Frozen rows keep
riding along in the fixed-shape batch but never advance their cache, emit, or count passes.

All per-step state lives in static device buffers updated in place, and the two step functions
(`_propose_step`, `_verify_step`) read and write only those buffers: on CUDA with
`use_cuda_graphs=True` each is captured once per (mode, sampling settings) as a
`torch.cuda.CUDAGraph` and replayed; the host reads one "any row still active" flag every
`sync_every` steps and the records once at the end, never per token. On the CPU the same functions
run eagerly.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..errors import exc_line
from ..model.cache import StaticKVCache
from ..model.layers import DecodeFusion, prepare_decode_kernels
from ..model.orthrus import DecodeState, DraftModel
from . import verify
from .lm_head import resolve_fused_argmax
from .rng import counter_uniforms, seed_hash, slot_hash, uniforms_from_hashes

MODES = ("spec", "ar")
FINISH = {0: "running", 1: "eos", 2: "length"}


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; min_p 0 = off (filters: `decode/verify.py`).

    draft_temperature: the temperature the drafts are *proposed* at (None = `temperature`; drafted decoding only,
    ignored when greedy). Any proposal keeps the output distribution exact, because the acceptance rule divides
    by the proposal actually used; what it changes is acceptance. 0 proposes each position's argmax (the rule then
    accepts d with probability p(d)). Measured on SmolLM2 at T=1 (docs/benchmarks.md, session 8), the default
    (the sampling temperature, as the official runtime) accepts the most: 2.47 against 2.28 at 0.5 and 1.95
    with argmax drafts."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    draft_temperature: Optional[float] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.draft_temperature is not None and not self.draft_temperature >= 0:
            raise ValueError(f"draft_temperature must be >= 0 or None (= temperature), got {self.draft_temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def proposal_temperature(self) -> float:
        """The temperature drafts are proposed at (0 when decoding is greedy)."""
        if self.greedy:
            return 0.0
        return self.temperature if self.draft_temperature is None else float(self.draft_temperature)

    @property
    def greedy_drafts(self) -> bool:
        """Drafts are each position's argmax (the rule's q is a point mass: `verify(draft_is_greedy=True)`)."""
        return self.proposal_temperature == 0


@dataclass
class RowRecord:
    """What one prompt produced, with the counts every metric is computed from (`eval/metrics.py`)."""
    tokens: list[int]  # emitted tokens (the EOS token included when the row stopped on it)
    prompt_len: int
    verify_passes: int  # backbone AR passes over [x_a, drafts] (prefill excluded)
    draft_passes: int  # backbone passes spent drafting (Orthrus: one per verify pass; Medusa, AR: 0)
    accepted: list[int]  # per verify pass: drafts accepted by the rule (0..K-1), before EOS/length cut
    finish_reason: str  # "eos" | "length"
    seed: int
    block_size: int  # K of the pass that produced it (1 for the AR baseline)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerateResult:
    rows: list[RowRecord]
    mode: str
    prefill_s: float  # wall seconds of the prefill pass (host-synchronized)
    decode_s: float  # wall seconds of the propose/verify loop (host-synchronized)
    steps: int  # batch steps run (includes up to sync_every-1 steps after the last row finished)
    batch_size: int  # engine batch (rows beyond len(prompts) are idle padding)
    cuda_graphs: bool
    refills: int = 0  # generate_many: refills after the first fill (each host-synchronized)
    prefill_passes: int = 0  # generate_many: prefill passes, the first fill's included (staged ahead: < refills + 1)
    prefill_graph_replays: int = 0  # prefill passes of the call that replayed a CUDA graph (`PrefillGraphs`)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def draft_probs(logits: torch.Tensor, sp: "SamplingParams") -> torch.Tensor:
    """The draft distribution q exactly as the acceptance rule computes it (so p/q is the right ratio)."""
    return torch.softmax(verify.processed_logits(logits, sp.temperature, sp.top_k, sp.top_p, sp.min_p), dim=-1)


def to_device(values, device: torch.device, dtype=torch.long) -> torch.Tensor:
    """Host values (a tensor or a list) on `device` without a stream sync: pinned staging and a non-blocking copy
    on CUDA (the caching host allocator keeps the staging buffer until the copy is done); as they are elsewhere."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


PREFILL_ALIGN = 64  # a prefill pass's padded length is a multiple of this (`prefill_shape`)


def prefill_shape(rows: int, length: int, align: int = PREFILL_ALIGN) -> tuple[int, int]:
    """The (rows, length) a prefill pass of `rows` prompts of at most `length` cached tokens runs at: rows rounded
    up to a power of two, length up to a multiple of `align` (0 or 1: as they are). On a GPU the first pass of
    each new shape costs far more than the pass itself (measured on an H200, SmolLM2 shape, session 15: 114-122 ms
    for a 4-row refill of a new prompt length, up to 970 ms where a kernel specialisation compiled, against 35 ms
    for the same length again), and the eval's and the data stage's refills come at ever new prompt lengths; a few
    buckets pay that once each. The padding costs compute only: padded positions come after every real one
    (causal) and padded rows are dropped, so the real rows' values are those of the unpadded pass."""
    if align <= 1:
        return rows, length
    return 1 << max(0, rows - 1).bit_length(), -(-length // align) * align


def prefill_pass(model: DraftModel, prompts: Sequence[Sequence[int]], device, dtype,
                 scratch: "ScratchCache | None" = None, align: int = PREFILL_ALIGN,
                 graphs: "PrefillGraphs | None" = None) -> tuple[StaticKVCache, torch.Tensor]:
    """One padded pass caching each prompt minus its last token in rows 0..n-1 of a scratch cache (slots
    0..len-2; the pass runs at `prefill_shape`, so the cache has at least n rows and the bucketed length).
    Returns (that cache, each prompt's final hidden state at its second-to-last position, (n, H), zeros for a
    one-token prompt). `prefill_rows` copies the rows into an engine's cache; `DecodeEngine.generate_many` keeps
    them staged until rows are free (`_Staged`). graphs: replay the shape's CUDA graph where `graphs` is enabled
    (`PrefillGraphs`: its scratch is the one used); None, disabled or its capture failed: the eager pass."""
    n = len(prompts)
    lens = [len(p) for p in prompts]
    L = max(1, max(lens) - 1)
    m, Lp = prefill_shape(n, L, align)
    ids = torch.zeros(m, Lp, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p) - 1] = torch.as_tensor(list(p[:-1]), dtype=torch.long)
    if graphs is not None:
        out = graphs.run(ids, lens)
        if out is not None:
            return out
        graphs.eager += 1
    tmp = scratch.get(m, Lp) if scratch is not None else model.new_cache(m, Lp, device=device, dtype=dtype)
    h = model.ar_cached(to_device(ids, device), tmp)[:n]  # (n, Lp, H): the real rows
    return tmp, _final_hidden(h, to_device(lens, device), dtype)


def _final_hidden(h: torch.Tensor, pl: torch.Tensor, dtype) -> torch.Tensor:
    """Row i's hidden state at position pl[i] - 2 of a prefill pass's output h (rows, Lp, H); zeros where
    pl[i] < 2 (a one-token prompt caches nothing; padded rows have pl 0)."""
    h_last = h[torch.arange(h.shape[0], device=h.device), (pl - 2).clamp(min=0)]
    return torch.where((pl >= 2)[:, None], h_last.to(dtype), 0)


def copy_prefilled(cache: StaticKVCache, idx: torch.Tensor, tmp: StaticKVCache, lo: int, n: int, L: int) -> None:
    """Rows lo..lo+n-1 of a `prefill_pass` cache, slots 0..L-1, into the rows `idx` (device, (n,)) of `cache`."""
    if L <= 0:
        return
    for k, v, tk, tv in zip(cache.k, cache.v, tmp.k, tmp.v):
        k[idx, :, :L] = tk[lo:lo + n, :, :L]
        v[idx, :, :L] = tv[lo:lo + n, :, :L]


def prefill_rows(model: DraftModel, cache: StaticKVCache, rows: list[int], prompts: Sequence[Sequence[int]],
                 chunk_tokens: int | None = None, scratch: "ScratchCache | None" = None,
                 align: int = PREFILL_ALIGN, graphs: "PrefillGraphs | None" = None) -> torch.Tensor:
    """Cache each prompt minus its last token in its row of `cache` (slots 0..len-2) while the other rows keep
    theirs: one padded pass per chunk of rows (at most `chunk_tokens` padded tokens) into a scratch
    cache, copied into the rows' slots. Returns each prompt's final hidden state at its second-to-last position,
    (n, H), zeros for a one-token prompt. `cache.lengths` is left to the caller. Host values go to the device
    with `to_device` (no stream stall). scratch: where the scratch caches come from (default: a new one per
    chunk, `model.new_cache`); a `ScratchCache` hands out the same shapes without allocating or zero-filling
    (bit-identical results). align: each pass runs at `prefill_shape` (padded rows and length: few distinct
    shapes); 0: at the chunk's own shape. graphs: each pass as `prefill_pass(graphs=...)`."""
    dev, dtype = cache.lengths.device, cache.k[0].dtype
    lens = [len(p) for p in prompts]
    L = max(lens) - 1
    last = torch.zeros(len(rows), model.config.hidden_size, device=dev, dtype=dtype)
    if L <= 0:
        return last
    Lp = prefill_shape(1, L, align)[1]
    step = max(1, chunk_tokens // Lp) if chunk_tokens else len(rows)
    if align > 1:  # whole power-of-two chunks: the padded rows stay within chunk_tokens
        step = 1 << (step.bit_length() - 1)
    for lo in range(0, len(rows), step):
        part = prompts[lo:lo + step]
        tmp, h_last = prefill_pass(model, part, dev, dtype, scratch, align, graphs)
        copy_prefilled(cache, to_device(rows[lo:lo + step], dev), tmp, 0, len(part), max(len(p) for p in part) - 1)
        last[lo:lo + len(part)] = h_last
    return last


def ahead_count(prompt_lens: Sequence[int], need: int, budget: int) -> int:
    """How many of the next prompts (their lengths, in order) one staging pass of `DecodeEngine.generate_many`
    prefills: at least `need` (the rows to fill now), grown by powers of two (the padded pass's rows) while the
    padded pass (`prefill_shape`) stays within `budget` tokens, at most the prompts left. budget 0: `need`."""
    left = len(prompt_lens)
    count = min(need, left)
    if budget <= 0:
        return count
    c = prefill_shape(count, 1)[0]  # the padded pass's rows: the next power of two, or twice the count
    c = c * 2 if c == count else c
    while count < left:
        cand = min(c, left)
        m, Lp = prefill_shape(cand, max(1, max(prompt_lens[:cand]) - 1))
        if m * Lp > budget:
            break
        count, c = cand, c * 2
    return count


class _Staged:
    """Prompts of one `generate_many` call prefilled ahead of their refill: prompts first..first+n-1 in rows
    0..n-1 of a `prefill_pass` cache (the engine's scratch), their last hidden states, and how many were taken.
    The scratch is reused by the next staging pass, which runs only once every staged prompt was taken."""

    def __init__(self):
        self.first = self.n = self.used = 0
        self.cache: StaticKVCache | None = None
        self.last: torch.Tensor | None = None
        self.lens: list[int] = []

    @property
    def left(self) -> int:
        return self.n - self.used


class ScratchCache:
    """Scratch caches for `prefill_rows`, reused from call to call: `get(m, L)` is a cache of exactly m rows and L
    slots (the shapes, strides and zero lengths of `model.new_cache(m, L)`), carved from per-layer storage that
    only grows, so a refill allocates and zero-fills nothing (61 fewer launches on a 30-layer model). Its K/V
    slots hold stale values, which no prefill reads: a pass over L tokens at lengths 0 writes every slot 0..L-1
    of a layer before that layer attends (`DraftModel._cached_pass`). Not for a caller that reads slots it did
    not write. `ar_cached` does not advance `lengths`, which stay zero. `reserve` sizes the storage ahead: a
    `PrefillGraphs` graph writes the addresses it had at capture, and `version` counts the moves."""

    def __init__(self, model: DraftModel, device, dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._lengths = torch.zeros(0, dtype=torch.long, device=device)
        self._tokens = 0  # row-slots the storage holds
        self._shape = (0, 0)  # (kv heads, head dim)
        self.version = 0  # bumped whenever the storage moves (a CUDA graph that wrote the old one is stale)

    @property
    def capacity(self) -> tuple[int, int]:
        """(row-slots, rows) the storage holds."""
        return self._tokens, self._lengths.numel()

    def reserve(self, tokens: int, rows: int = 0) -> None:
        """Storage for at least `tokens` row-slots and `rows` rows (grown, never shrunk)."""
        if tokens > self._tokens:
            self._k, self._v = [], []  # drop the old storage before taking the new
            like = self.model.new_cache(1, 1, device=self.device, dtype=self.dtype)
            per_token = like.k[0][0, :, 0].numel()  # kv heads x head dim
            self._tokens = tokens
            n = self._tokens * per_token
            self._k = [torch.empty(n, device=self.device, dtype=self.dtype) for _ in like.k]
            self._v = [torch.empty(n, device=self.device, dtype=self.dtype) for _ in like.v]
            self._shape = like.k[0].shape[1], like.k[0].shape[3]
            self.version += 1
        if rows > self._lengths.numel():
            self._lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
            self.version += 1

    def get(self, m: int, L: int) -> StaticKVCache:
        self.reserve(m * L, m)
        H, D = self._shape
        size = m * H * L * D
        return StaticKVCache([t[:size].view(m, H, L, D) for t in self._k], [t[:size].view(m, H, L, D) for t in self._v],
                             self._lengths[:m])


class _PrefillGraph:
    """One captured prefill pass: its static input (token ids (m, Lp) then prompt lengths (m,), flat), graph and
    static output (each row's final hidden state, (m, H))."""

    def __init__(self, graph, inp: torch.Tensor, out: torch.Tensor):
        self.graph, self.inp, self.out = graph, inp, out


class PrefillGraphs:
    """CUDA graphs of `prefill_pass`, one per padded shape (m, Lp) (`prefill_shape`: few shapes), for an engine that
    runs CUDA graphs: an eager pass is launch-bound (an H200, SmolLM2 shape: 21-30 ms whether 2 or 16 rows, hundreds
    of kernels launched from Python), a replay launches one graph. A shape is captured when first needed (side-stream
    warm-up, then the capture, as the decode steps are); a replay copies the host ids and lengths into the shape's
    static input in one non-blocking copy, replays, and returns (the scratch cache view, a fresh copy of the final
    hidden states): the same values as the eager pass (the same kernels at the same shape).

    The graphs write the K/V into `scratch` (the engine's `ScratchCache`) at the addresses it had at capture: when
    the scratch's storage moves (`ScratchCache.version`, it grew), every graph is dropped and recaptured as needed.
    Dropping takes a fresh memory pool (see `_drop_graphs`); the pool is this object's alone, apart from the decode
    steps' (dropping either leaves the other). A capture failure: a warning, `error` set, and the eager pass from
    then on (`run` returns None). `enabled` False (the engine runs no CUDA graphs, or its prefill_graphs switch is
    off): `run` returns None and touches nothing. Counts: `replays` (graphed passes), `eager` (passes `prefill_pass`
    ran eagerly with this object given), `captures`."""

    def __init__(self, model: DraftModel, scratch: ScratchCache, enabled: bool = True):
        self.model, self.scratch = model, scratch
        self.enabled = enabled
        self.error: str | None = None
        self.replays = self.eager = self.captures = 0
        self._graphs: dict[tuple[int, int], _PrefillGraph] = {}
        self._pool = None
        self._version = scratch.version

    def __len__(self) -> int:
        return len(self._graphs)

    def drop(self) -> None:
        """Forget every graph and the pool (parameters or scratch storage moved)."""
        _drop_graphs(self)

    def run(self, ids: torch.Tensor, lens: Sequence[int]) -> tuple[StaticKVCache, torch.Tensor] | None:
        """The pass over host `ids` (m, Lp) (a padded `prefill_pass` batch) and the real rows' prompt lengths, by
        graph replay; None where not enabled or the capture failed (the caller runs the eager pass)."""
        if not self.enabled or self.error is not None:
            return None
        m, Lp = ids.shape
        n = len(lens)
        cache = self.scratch.get(m, Lp)
        if self.scratch.version != self._version:  # the storage the graphs write into moved
            self.drop()
            self._version = self.scratch.version
        host = torch.zeros(m * Lp + m, dtype=torch.long)
        host[: m * Lp] = ids.reshape(-1)
        host[m * Lp: m * Lp + n] = torch.tensor(list(lens), dtype=torch.long)
        g = self._graphs.get((m, Lp))
        if g is None:
            try:
                g = self._graphs[(m, Lp)] = self._capture(cache, m, Lp)
            except Exception as e:  # noqa: BLE001 - e.g. a model with host syncs: the eager pass, for good
                self.error = exc_line(e, 500)
                warnings.warn(f"CUDA graph capture of a prefill pass failed ({self.error}); prefilling eagerly")
                self.drop()
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - the failed capture may have left an error on the stream
                    pass
                return None
        # one non-blocking copy from pinned memory (the caching host allocator keeps it until the copy is done)
        g.inp.copy_(host.pin_memory() if g.inp.is_cuda else host, non_blocking=True)
        g.graph.replay()
        self.replays += 1
        # a copy: the static output is rewritten by the next replay, and a staged pass's states outlive it
        return cache, g.out[:n].clone()

    def _capture(self, cache: StaticKVCache, m: int, Lp: int) -> _PrefillGraph:
        inp = torch.zeros(m * Lp + m, dtype=torch.long, device=self.scratch.device)  # outside the pool
        ids, pl = inp[: m * Lp].view(m, Lp), inp[m * Lp:]
        dtype = self.scratch.dtype

        def pass_():
            return _final_hidden(self.model.ar_cached(ids, cache), pl, dtype)

        g, out = self._record(pass_)
        self.captures += 1
        return _PrefillGraph(g, inp, out)

    def _record(self, fn: Callable[[], torch.Tensor]):
        """`fn` as a CUDA graph in this object's pool, after a side-stream warm-up: (the graph, fn's output)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):  # warm up (kernel selection, Triton compilation) outside the graph
                fn()
        torch.cuda.current_stream().wait_stream(s)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g, pool=self._pool):
            out = fn()  # one pool for every shape: passes never overlap, outputs are copied after each replay
        return g, out


def should_refill(free: int, batch: int, idle_row_steps: float, step_s: float, refill_s: float,
                  remaining: int) -> bool:
    """The adaptive refill rule of `DecodeEngine.generate_many`, the classic 2-competitive ski-rental rule (rent
    until the rent paid equals the price, then buy: at most twice what the best choice in hindsight would have
    cost for that one wait-or-refill decision).

    A decode step costs `step_s` whatever the number of busy rows (fixed shapes), so a row-step spent idle loses
    step_s / batch seconds of throughput; a refill costs `refill_s` (one eager prefill pass, launch-bound: about
    the same for 1 row as for B). Refill once the throughput lost to idle rows since the last refill,
    idle_row_steps / batch * step_s, reaches the price of one refill. Refill at once when the batch is idle
    (nothing else to run), or when the free rows take every remaining prompt (a last refill is due anyway and
    waiting only delays the tail). Nothing to refill: never (free rows or remaining prompts 0)."""
    if free < 1 or remaining < 1:
        return False
    if free >= batch or free >= remaining:
        return True
    return idle_row_steps / batch * step_s >= refill_s


@dataclass
class RefillCost:
    """Running estimates of the seconds of one refill for the adaptive rule (kept by the engine across calls), by
    kind: "pass" (a refill that runs a prefill pass: its prompts were not staged) and "copy" (its prompts were
    staged by an earlier pass: only their cache rows are copied). Before a kind was measured: `prior_steps`
    decode steps ("copy": `copy_prior_steps`, default the same). Measurements (host-synchronized refills after a
    call's first fill) enter a decayed mean per kind (weight `decay` per newer one), so the estimates follow the
    prompt lengths of the current benchmark. learn=False: always the priors (tests: decisions in step units)."""
    prior_steps: float = 8.0
    learn: bool = True
    decay: float = 0.8
    copy_prior_steps: float | None = None
    _sum: dict = field(default_factory=dict)
    _weight: dict = field(default_factory=dict)

    def observe(self, seconds: float, kind: str = "pass") -> None:
        if self.learn:
            self._sum[kind] = self._sum.get(kind, 0.0) * self.decay + seconds
            self._weight[kind] = self._weight.get(kind, 0.0) * self.decay + 1.0

    def seconds(self, step_s: float, kind: str = "pass") -> float:
        if self._weight.get(kind, 0.0) > 0:
            return self._sum[kind] / self._weight[kind]
        prior = self.copy_prior_steps if kind == "copy" and self.copy_prior_steps is not None else self.prior_steps
        return prior * step_s


# _State.row_vars, in order: cache length, newest token x_a, seed, rng.seed_hash(seed), max new tokens, tokens out,
# verify passes, finish code (FINISH)
ROW_VARS = ("lengths", "last_token", "seeds", "seed_h", "max_new", "n_out", "n_verify", "finish")


class _State:
    """Static per-step buffers of one engine (fixed shapes: batch B, block K, slots S)."""

    def __init__(self, model: DraftModel, B: int, S: int, K: int, out_width: int, dtype, device):
        H = model.config.hidden_size
        V = model.backbone.get_output_embeddings().weight.shape[0]
        self.cache = model.new_cache(B, S, device=device, dtype=dtype)
        z = dict(device=device, dtype=torch.long)
        # the per-row integers a refill sets, one (B,) row each of one (F, B) tensor (contiguous views), so that
        # arming rows is one indexed write (`DecodeEngine._refill`); cache.lengths is the first of them
        self.row_vars = torch.zeros(len(ROW_VARS), B, **z)
        for name, t in zip(ROW_VARS, self.row_vars):
            setattr(self, name, t)
        self.cache.lengths = self.lengths
        self.last_hidden = torch.zeros(B, H, device=device, dtype=dtype)
        self.active = torch.zeros(B, device=device, dtype=torch.bool)
        self.any_active = torch.zeros((), device=device, dtype=torch.bool)
        self.out = torch.zeros(B, out_width, **z)  # last column: sink for masked writes
        self.acc = torch.full((B, out_width), -1, **z)
        self.drafts = torch.zeros(B, K - 1, **z)
        self.draft_logits = torch.zeros(B, K - 1, V, device=device, dtype=dtype)
        self.eos = torch.full((16,), -1, **z)
        # constants of the step functions (device tensors made once, so a step launches no fills for them)
        self.rows = torch.arange(B, **z)
        self.cols = {T: torch.arange(T, **z) for T in (1, K)}
        self.sink = torch.tensor(out_width - 1, **z)  # last column of out / acc: sink for masked writes
        self.zeros = torch.zeros(B, 1, **z)


def compile_failed(e: BaseException) -> bool:
    """An error raised by torch.compile itself (Dynamo tracing, Inductor code generation), not by the step."""
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))


class CompiledOrEager:
    """A torch.compile'd step that runs the eager function instead, from then on, if compilation fails: an
    Inductor bug on one shape must not end a regeneration or an eval (measured: torch 2.11 fails to generate
    code for the sampled step's (256, 49152) cumsum). `owner.compile_error` says what failed; a warning too.
    A failure surfaces before the compiled step changes any state read later (the step's writes to the cache
    are idempotent until the lengths advance, at its end), so the eager re-run gives the same tokens."""

    def __init__(self, owner, fn: Callable, **compile_kw):
        self.owner, self.fn = owner, fn
        self.compiled: Callable | None = torch.compile(fn, **compile_kw)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - only compilation failures are caught (re-raised otherwise)
                if not compile_failed(e):
                    raise
                self.compiled = None
                self.owner.compile_error = exc_line(e, 300)
                warnings.warn(f"torch.compile failed ({self.owner.compile_error}); this step runs uncompiled")
        return self.fn(*args)


def _drop_graphs(engine) -> None:
    """Forget an engine's captured CUDA graphs and their memory pool with them. Once a pool's graphs are gone the
    caching allocator releases the pool, and a capture into its old handle fails an internal assertion
    (`use_count > 0`; torch 2.11 on an H200, session 17), which left the engine silently eager: the next capture
    takes a fresh pool."""
    engine._graphs.clear()
    engine._pool = None

class DecodeEngine:
    """Batched speculative / AR decoding on one static cache.

    model: an `OrthrusModel` or `MedusaModel` (any `DraftModel` with `propose`).
    batch_size: fixed batch B of every pass (a call with fewer prompts pads with idle rows).
    max_len: cache slots per row; must hold prompt + max_new_tokens + K + 1.
    use_cuda_graphs: capture the propose and verify steps as CUDA graphs (CUDA only; ignored on CPU).
    sync_every: steps between host reads of the "all rows done" flag.
    verify_backend: backend of the acceptance rule's front door ("auto" | "triton" | "torch").
    verify_fn: the acceptance rule, called like `decode.verify.verify` (the default); tests inject
      deliberately broken rules here.
    compile_steps: torch.compile the step functions (before any graph capture): fewer, fused kernels for
      launch-bound models; costs compilation time once per mode and sampling setting.
    fuse_projections: one q/k/v matmul per attention view and one gate/up matmul per dense MLP in the decode
      passes (`layers.DecodeFusion`: the parameters become slices of the fused weights, no copy; attached to the
      modules only during the engine's calls).
    prefill_ahead_tokens: `generate_many` prefills the next prompts ahead of their refill, as many as fit this
      many padded tokens in one pass (and at least the rows to fill), and keeps them staged in a scratch cache; a
      refill whose prompts are staged only copies their cache rows. A prefill pass is launch-bound (an H200,
      SmolLM2 shape: 26 ms for 16 rows of 200 tokens, 23 ms for 2), so one pass for many refills makes each refill
      cheap, and the adaptive rule then refills sooner (fewer idle rows). Costs scratch memory: this many tokens of
      K/V. 0: each refill prefills exactly its own prompts.
    prefill_graphs: with CUDA graphs, replay each prefill pass (refills, staging passes, `warm_prefill`) as a
      CUDA graph per padded shape (`PrefillGraphs`) instead of launching it eagerly; ignored without CUDA graphs.
      The attribute of that name can be changed between calls. Counts: `prefill_graph_replays`,
      `prefill_eager_passes`; a failed capture: `prefill_graph_error` (the eager pass from then on).
    fused_argmax: the greedy paths take each position's argmax token straight from the final hidden states with
      one Triton kernel (`decode.lm_head`, `orthrus_kernels.lm_head_argmax`), without writing the logits: greedy
      drafts (`SamplingParams.greedy_drafts`), and at temperature 0 the verify step and the AR step (the greedy rule
      needs only the target's argmax: `verify.greedy_accept`; with an injected `verify_fn` the verify step keeps
      the logits, the rule under test reads them). Sampled paths are unchanged. Decided when the engine is built:
      where the kernel cannot run (no Triton, not a CUDA device nor the interpreter, a biased lm_head, its probe
      failing) one warning, the unfused path, and the reason in `fused_argmax_error`; `fused_argmax_active` says
      whether it runs. Off by default: token-identical in the CPU tests, not yet run on a GPU.
    """

    def __init__(self, model: DraftModel, batch_size: int, max_len: int, use_cuda_graphs: bool = False,
                 sync_every: int = 4, verify_backend: str = "auto", verify_fn: Callable | None = None,
                 compile_steps: bool = False, fuse_projections: bool = True, prefill_ahead_tokens: int = 16384,
                 prefill_graphs: bool = True, fused_argmax: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefill_ahead_tokens < 0:
            raise ValueError(f"prefill_ahead_tokens must be >= 0, got {prefill_ahead_tokens}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.model = model
        self.K = model.block_size
        self.B = batch_size
        self.S = max_len
        p = next(model.backbone.parameters())
        self.device, self.dtype = p.device, p.dtype
        prepare_decode_kernels(self.device)  # "auto" probes the kernels here, not in a compiled / captured step
        self.sync_every = sync_every
        self.verify_fn = verify_fn or verify.verify
        self.verify_backend = verify_backend
        self.cuda_graphs = bool(use_cuda_graphs and self.device.type == "cuda")
        if use_cuda_graphs and not self.cuda_graphs:
            warnings.warn("use_cuda_graphs=True ignored: the model is not on a CUDA device (running eagerly)")
        self.compile_steps = bool(compile_steps)
        self._compiled: dict = {}
        self.compile_error: str | None = None  # set where a compiled step fell back to eager (CompiledOrEager)
        self.graph_error: str | None = None
        self._graphs: dict = {}
        self._pool = None
        self._fusion = DecodeFusion(model) if fuse_projections else None
        self._st = _State(model, self.B, self.S, self.K, self.S + self.K + 1, self.dtype, self.device)
        self._scratch: ScratchCache | None = None  # prefill scratch caches of the refills (made on first use)
        self.prefill_graphs = bool(prefill_graphs)
        self._pg: PrefillGraphs | None = None  # the prefill passes' graphs, over the scratch (made with it)
        self._warmed: set[tuple[int, int]] = set()  # prefill shapes warm_prefill ran
        self.prefill_ahead_tokens = prefill_ahead_tokens
        # the adaptive refill rule's estimates of one refill's seconds (generate_many; kept across calls)
        self.refill_cost = RefillCost(copy_prior_steps=1.0)
        self._mode = "spec"
        self._sampling = SamplingParams()
        # the slot part of the counter-based uniforms (fixed per engine: rng.counter_uniforms in three parts)
        self._slot_h = {"draft": slot_hash(0, self.K - 1, self.device),
                        "spec": slot_hash(self.K - 1, self.K, self.device), "ar": slot_hash(self.K - 1, 1, self.device)}
        # the fused greedy LM head: probed at the layouts the steps hand over (draft: a (B, K-1) view of the K-token
        # pass, Medusa's stacked heads contiguous; verify (B, K); AR (B, 1))
        self.fused_argmax = bool(fused_argmax)
        self.fused_argmax_error: str | None = None
        self._argmax = None
        if self.fused_argmax:
            draft = (self.B, self.K - 1, self.K if model.draft_passes_per_step else self.K - 1)
            self._argmax, self.fused_argmax_error = resolve_fused_argmax(
                model, [draft, (self.B, self.K, self.K), (self.B, 1, 1)])
            if self.fused_argmax_error:
                warnings.warn(f"fused_argmax: the fused greedy LM head cannot run here ({self.fused_argmax_error}); "
                              "using the LM head's logits and argmax")
        # greedy drafts by the kernel need the drafter's hidden states: a model whose `propose` is its own (not the
        # logits of `propose_hidden`) keeps proposing logits
        self._argmax_drafts = (self._argmax is not None and "propose" not in vars(model)
                               and type(model).propose is DraftModel.propose)

    @property
    def fused_argmax_active(self) -> bool:
        """Whether the fused greedy LM head runs in this engine's greedy paths (`fused_argmax` asked for it and it
        could run here; else `fused_argmax_error` says why not)."""
        return self._argmax is not None

    def _fused(self):
        """Context of one call: the fused decode projections (re)made if the parameters moved since the last call
        (graphs and compiled steps over the old weights dropped then) and attached for the call's duration."""
        if self._fusion is None:
            return contextlib.nullcontext()
        if self._fusion.refresh():
            _drop_graphs(self)
            self._compiled.clear()
            if self._pg is not None:
                self._pg.drop()
        return self._fusion

    def _prefill_graphs(self) -> PrefillGraphs:
        """The prefill passes' scratch cache and graphs (made on first use); the graphs replay only while the engine
        runs CUDA graphs and `prefill_graphs` is on."""
        if self._pg is None:
            if self._scratch is None:
                self._scratch = ScratchCache(self.model, self.device, self.dtype)
            self._pg = PrefillGraphs(self.model, self._scratch)
        self._pg.enabled = self.cuda_graphs and self.prefill_graphs
        return self._pg

    def _call_scratch(self) -> tuple[int, int]:
        """(row-slots, rows) of scratch a `generate_many` call reserves first: a staging pass runs up to
        prefill_ahead_tokens padded tokens (more only when the rows to fill need it), of at most that many rows of
        PREFILL_ALIGN slots."""
        return self.prefill_ahead_tokens, max(prefill_shape(self.B, 1)[0], self.prefill_ahead_tokens // PREFILL_ALIGN)

    def _reserve_scratch(self, tokens: int, rows: int) -> None:
        """Size the scratch for the passes ahead at once where graphs replay (a growth drops every prefill graph);
        eager passes grow it as they need."""
        pg = self._prefill_graphs()
        if pg.enabled and pg.error is None:
            pg.scratch.reserve(tokens, rows)

    @property
    def prefill_graph_replays(self) -> int:
        """Prefill passes that replayed a CUDA graph (every call so far, warm-ups included)."""
        return self._pg.replays if self._pg is not None else 0

    @property
    def prefill_eager_passes(self) -> int:
        """Prefill passes that ran eagerly (every call so far, warm-ups included)."""
        return self._pg.eager if self._pg is not None else 0

    @property
    def prefill_graph_error(self) -> str | None:
        """Why a prefill pass's capture failed (prefill passes then run eagerly); None otherwise."""
        return self._pg.error if self._pg is not None else None

    # ------------------------------------------------------------------------------- step functions
    def _uniforms(self, slots: str) -> torch.Tensor:
        """== counter_uniforms(seeds, n_verify, offset, n) of the slots named (draft / spec / ar verify)."""
        st = self._st
        return uniforms_from_hashes(st.seed_h, st.n_verify, self._slot_h[slots])

    def _propose_step(self) -> None:
        st, m = self._st, self.model
        state = DecodeState(st.cache, st.last_token, st.last_hidden)
        sp = self._sampling
        if sp.greedy_drafts and self._argmax_drafts:  # the argmax without the logits (fused_argmax)
            st.drafts.copy_(self._argmax(m.propose_hidden(state), m.lm_weight()))
            return
        logits = m.propose(state)
        if sp.greedy_drafts:  # greedy decoding, or argmax proposals: the rule never reads the draft logits
            torch.argmax(logits, -1, out=st.drafts)
            return
        if sp.proposal_temperature != sp.temperature:  # q = softmax(logits / t_draft), as the rule sees it at T
            logits = logits * (sp.temperature / sp.proposal_temperature)
        d = verify.inverse_cdf(draft_probs(logits, sp), self._uniforms("draft"))
        st.draft_logits.copy_(logits)
        st.drafts.copy_(d)

    def _verify_step(self) -> None:
        st, model, sp = self._st, self.model, self._sampling
        spec = self._mode == "spec"
        ids = torch.cat([st.last_token[:, None], st.drafts], 1) if spec else st.last_token[:, None]
        T = ids.shape[1]
        # ids are sampled tokens (never the mask token): no mask-embedding handling
        hidden = model.ar_cached(ids, st.cache, real_tokens=True)  # (B, T, H)
        drafts = st.drafts if spec else st.drafts[:, :0]
        if sp.greedy and self._argmax is not None and self.verify_fn is verify.verify:
            # the greedy rule on the target's argmax, taken without the logits (fused_argmax)
            m, nxt = verify.greedy_accept(drafts, self._argmax(hidden, model.lm_weight()))
        else:
            target = model.logits(hidden)  # (B, T, V)
            dlog = st.draft_logits if spec else st.draft_logits[:, :0]
            u = None if sp.greedy else self._uniforms(self._mode)  # the greedy rule draws nothing
            extra = {"draft_is_greedy": True} if spec and not sp.greedy and sp.greedy_drafts else {}
            m, nxt = self.verify_fn(drafts, dlog, target, u, temperature=sp.temperature, top_k=sp.top_k,
                                    top_p=sp.top_p, min_p=sp.min_p, backend=self.verify_backend, **extra)
        m, nxt = m.long(), nxt.long()
        if spec:
            self._commit_block(drafts, m, nxt, hidden)
        else:
            self._commit_one(nxt)

    def _commit_block(self, drafts, m, nxt, hidden) -> None:
        """Bookkeeping of a drafted step: emit d_1..d_m and the next token (cut at EOS / max_new_tokens).
        Invariants used: 0 <= n_out <= max_new for every row; finished rows are inactive."""
        st = self._st
        act = st.active
        j = st.cols[drafts.shape[1] + 1]
        # tokens emitted at slots j = 0..m: d_1..d_m, then the rule's next token (slots > m: never emitted)
        cand = torch.cat([drafts, nxt[:, None]], 1).scatter_(1, m[:, None], nxt[:, None])
        # the first EOS among the candidates (T if none); one past m cannot cut: n_emit <= m + 1 anyway
        first_eos = (~(cand[..., None] == st.eos).any(-1)).cumprod(1).sum(1)
        n_emit = torch.minimum(torch.minimum(m, first_eos) + 1, st.max_new - st.n_out) * act
        pos = torch.where(j[None] < n_emit[:, None], st.n_out[:, None] + j[None], st.sink)
        st.out.scatter_(1, pos, cand)
        st.acc.scatter_(1, torch.where(act, st.n_verify, st.sink)[:, None], m[:, None])
        st.n_verify.add_(act)
        st.n_out.add_(n_emit)
        hit_eos = first_eos < n_emit  # (n_emit = 0 for inactive rows)
        finished = act & (hit_eos | (st.n_out >= st.max_new))
        st.finish.masked_fill_(finished, 2).masked_fill_(hit_eos, 1)  # hit_eos implies finished
        still = act ^ finished  # finished implies act
        st.cache.lengths.add_((m + 1) * still)
        torch.where(still, nxt, st.last_token, out=st.last_token)
        if self.model.uses_last_hidden:
            torch.where(still[:, None], hidden[st.rows, m].to(st.last_hidden.dtype), st.last_hidden,
                        out=st.last_hidden)
        st.active.copy_(still)
        torch.any(still, out=st.any_active)

    def _commit_one(self, nxt) -> None:
        """Bookkeeping of an AR step (m = 0: emit the next token). An active row has n_out < max_new, so it
        emits exactly one token; n_out == n_verify for every row. last_hidden is not kept (no drafter reads it
        in AR mode; prefill sets it)."""
        st = self._st
        act = st.active
        pos = torch.where(act, st.n_out, st.sink)[:, None]
        st.out.scatter_(1, pos, nxt[:, None])
        st.acc.scatter_(1, pos, st.zeros)  # n_verify == n_out
        st.n_verify.add_(act)
        st.n_out.add_(act)
        hit_eos = act & (nxt[:, None] == st.eos).any(-1)
        finished = hit_eos | (act & (st.n_out >= st.max_new))
        st.finish.masked_fill_(finished, 2).masked_fill_(hit_eos, 1)
        still = act ^ finished
        st.cache.lengths.add_(still)
        torch.where(still, nxt, st.last_token, out=st.last_token)
        st.active.copy_(still)
        torch.any(still, out=st.any_active)

    # ------------------------------------------------------------------------------- graphs
    def _steps(self):
        """The callables of one decode step for the current mode and sampling settings."""
        fns = [self._propose_step, self._verify_step] if self._mode == "spec" else [self._verify_step]
        key = (self._mode, self._sampling)
        if self.compile_steps:  # fuse the many small kernels of a step (compiled once per mode + sampling)
            if key not in self._compiled:
                self._compiled[key] = [CompiledOrEager(self, f, dynamic=False) for f in fns]
            fns = self._compiled[key]
        if not self.cuda_graphs:
            return fns
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(fns)
            except Exception as e:  # e.g. MoE routing with host syncs: cannot be captured
                self.graph_error = f"{e.__class__.__name__}: {str(e)[:500]}"
                warnings.warn(f"CUDA graph capture failed ({self.graph_error}); decoding eagerly")
                self.cuda_graphs = False
                _drop_graphs(self)
                if self._pg is not None:  # prefill graphs replay only beside the step graphs: free their pool
                    self._pg.drop()
                try:
                    torch.cuda.synchronize()
                except Exception:  # the failed capture may have left an error on the stream
                    pass
                return fns
        return [g.replay for g in self._graphs[key]]

    def _capture(self, fns):
        st = self._st
        saved = {k: v.clone() for k, v in vars(st).items() if isinstance(v, torch.Tensor)}
        saved_len = st.cache.lengths.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):  # warm up (kernel selection, Triton compilation) outside the graph
                for f in fns:
                    f()
        torch.cuda.current_stream().wait_stream(s)
        graphs = []
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for f in fns:  # one memory pool: the graphs never run concurrently, results live in static buffers
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self._pool):
                    f()
                graphs.append(g)
        for k, v in saved.items():  # warm-up steps moved the state; the cache K/V they wrote lie past
            getattr(st, k).copy_(v)  # every committed length and are overwritten before being read
        st.cache.lengths.copy_(saved_len)
        return graphs

    # ------------------------------------------------------------------------------- generate
    def required_slots(self, prompt_len: int, max_new_tokens: int) -> int:
        return prompt_len + max_new_tokens + self.K + 1

    def _check_call(self, prompts, max_new_tokens: int, seeds, eos_token_ids, mode: str, most: int | None):
        """Validate one call's arguments; returns (sorted end-of-sequence ids, seeds as a list)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        n = len(prompts)
        if n < 1:
            raise ValueError("no prompts")
        if most is not None and n > most:
            raise ValueError(f"got {n} prompts; this engine decodes 1..{most} per call (batch_size)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if any(len(p) < 1 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if self.required_slots(longest, max_new_tokens) > self.S:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} + K={self.K} + 1 "
                             f"needs {self.required_slots(longest, max_new_tokens)} cache slots; the engine has "
                             f"max_len={self.S}")
        eos = sorted({int(e) for e in eos_token_ids})
        if len(eos) > self._st.eos.numel():
            raise ValueError(f"at most {self._st.eos.numel()} end-of-sequence ids, got {eos}")
        seeds = list(range(n)) if seeds is None else [int(x) for x in seeds]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        return eos, seeds

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams | None = None,
                 seeds: Sequence[int] | None = None, eos_token_ids: Sequence[int] = (), mode: str = "spec"
                 ) -> GenerateResult:
        """Decode up to `batch_size` prompts (lists of token ids) as one fixed batch. mode "spec": propose +
        verify; "ar": the AR baseline (verify with no drafts). seeds: one per prompt (default 0..n-1)."""
        eos, seeds = self._check_call(prompts, max_new_tokens, seeds, eos_token_ids, mode, self.B)
        with self._fused():
            return self._generate(prompts, max_new_tokens, sampling, seeds, eos, mode)

    def _begin(self, mode: str, sampling):
        """A call's setup, before its clock starts: the mode and sampling its steps run with, the device sync,
        and the step functions (which may capture graphs). Returns (sync, step functions)."""
        self._mode = mode
        self._sampling = sampling or SamplingParams()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        steps_fns = self._steps()
        sync()
        return sync, steps_fns

    @torch.no_grad()
    def _generate(self, prompts, max_new_tokens, sampling, seeds, eos, mode) -> GenerateResult:
        n = len(prompts)
        st = self._st
        sync, steps_fns = self._begin(mode, sampling)
        replays = self.prefill_graph_replays
        t0 = time.perf_counter()
        self._prefill(prompts, max_new_tokens, seeds, eos)
        sync()
        t1 = time.perf_counter()
        steps = 0
        for steps in range(1, max_new_tokens + 1):  # every active row emits >= 1 token per step
            for f in steps_fns:
                f()
            if steps % self.sync_every == 0 and not bool(st.any_active):
                break
        sync()
        t2 = time.perf_counter()

        rows = self._records(list(range(n)), prompts, seeds, list(range(n)), mode)
        return GenerateResult(rows, mode, t1 - t0, t2 - t1, steps, self.B, self.cuda_graphs,
                              prefill_graph_replays=self.prefill_graph_replays - replays)

    def _prefill(self, prompts, max_new_tokens, seeds, eos):
        """A fixed batch: every row disarmed, then rows 0..n-1 armed with the prompts."""
        self._reset(eos)
        self._refill(list(range(len(prompts))), prompts, seeds, max_new_tokens)

    def _reset(self, eos) -> None:
        """No row active; the call's end-of-sequence ids."""
        st = self._st
        st.active.zero_()
        st.eos.fill_(-1)
        if eos:
            st.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long)

    @torch.no_grad()
    def warm_prefill(self, prompt_lengths: Sequence[int]) -> int:
        """Run, untimed, one prefill pass at every shape (`prefill_shape`: rows a power of two, length a multiple of
        PREFILL_ALIGN) that prompts of these lengths can need here, so that each shape's first-pass cost (kernel
        specialisation and selection: 0.1-1 s each on an H200, session 15) is paid before a timed call and not
        inside it: rows up to the batch (a batch of 12 pads its 9-12-row refills to 16), and up to what
        `generate_many` stages ahead at that length (`_ahead_count`). With prefill graphs each shape's graph is
        captured here (the scratch sized for the largest shape first). The passes write only the scratch cache; the
        engine's rows are untouched. A shape warmed once is not run again (the engine remembers). Returns the passes
        run."""
        by_len: dict[int, int] = {}
        for n in prompt_lengths:  # one real length per length bucket
            if 2 <= n <= self.S:
                by_len.setdefault(prefill_shape(1, n - 1)[1], n)
        todo: list[tuple[int, int]] = []  # (rows, prompt length) of each pass to run
        for n in by_len.values():
            Lp = prefill_shape(1, n - 1)[1]
            ahead = self.prefill_ahead_tokens // Lp  # the most rows a staging pass at this length runs
            most = max(self.B, 1 << (ahead.bit_length() - 1) if ahead else 0)
            for m in sorted({prefill_shape(m, 1)[0]: m for m in range(1, most + 1)}.values()):
                if prefill_shape(m, n - 1) not in self._warmed:
                    todo.append((m, n))
        if not todo:
            return 0
        shapes = [prefill_shape(m, n - 1) for m, n in todo]
        # the scratch sized before any capture for the largest shape and for what a call reserves first
        # (`_call_scratch`): a later growth would drop every graph made here, and the first timed call would capture
        # them all again inside its clock. (Session 20: warmed only to its shapes' 128 rows, the eval's humaneval
        # scratch grew to a call's 256 rows in the first timed run, the drafted one, which spent 0.28 s more outside
        # its decode steps than the AR run after it.)
        call_tokens, call_rows = self._call_scratch()
        self._reserve_scratch(max(call_tokens, max(m * L for m, L in shapes)), max(call_rows, max(m for m, _ in shapes)))
        graphs = self._prefill_graphs()
        with self._fused():
            for (m, n), shape in zip(todo, shapes):
                prefill_pass(self.model, [[0] * n] * m, self.device, self.dtype, self._scratch, graphs=graphs)
                self._warmed.add(shape)
        return len(todo)

    # ------------------------------------------------------------------------------- continuous batching
    def _refill(self, rows: list[int], prompts: list[Sequence[int]], seeds: list[int], max_new_tokens: int,
                last: torch.Tensor | None = None) -> None:
        """Arm `rows` with new prompts while the other rows keep their state: the prompts are prefilled into
        the rows' slots (`prefill_rows`, scratch caches reused, graphed where `prefill_graphs`; `last` given: the
        caller copied them already and these are their last hidden states) and the rows' counters, flags and last
        hidden state are reset. No host sync: the row indices and per-row integers (`ROW_VARS`, seed hashes computed
        on the host: the same integer arithmetic) travel in one pinned, non-blocking copy and land in one write."""
        st = self._st
        n = len(rows)
        sd = torch.tensor(seeds, dtype=torch.long)
        vals = {"lengths": [len(p) - 1 for p in prompts], "last_token": [int(p[-1]) for p in prompts],
                "max_new": [max_new_tokens] * n}
        host = torch.zeros(1 + len(ROW_VARS), n, dtype=torch.long)  # row 0: the engine rows; then ROW_VARS
        host[0] = torch.tensor(rows, dtype=torch.long)
        for j, name in enumerate(ROW_VARS):
            if name in vals:
                host[1 + j] = torch.tensor(vals[name], dtype=torch.long)
        host[1 + ROW_VARS.index("seeds")] = sd
        host[1 + ROW_VARS.index("seed_h")] = seed_hash(sd)
        dev = to_device(host, self.device)
        idx = dev[0]
        if last is None:
            graphs = self._prefill_graphs()
            last = prefill_rows(self.model, st.cache, rows, prompts, scratch=graphs.scratch, graphs=graphs)
        st.row_vars[:, idx] = dev[1:]
        st.last_hidden[idx] = last
        st.acc[idx] = -1
        st.drafts[idx] = 0
        st.active[idx] = True
        st.any_active.fill_(True)

    def _ahead_count(self, prompts: Sequence[Sequence[int]], first: int, need: int) -> int:
        most = max(need, self.prefill_ahead_tokens // PREFILL_ALIGN)  # a padded row takes at least ALIGN slots
        return ahead_count([len(p) for p in prompts[first:first + most]], need, self.prefill_ahead_tokens)

    def _refill_staged(self, rows: list[int], prompts: Sequence[Sequence[int]], first: int, seeds: list[int],
                       max_new_tokens: int, staged: _Staged) -> int:
        """Arm `rows` with prompts first..first+len(rows)-1 of the call: staged ones are copied from the staging
        cache; when it runs out, one `prefill_pass` stages the next `_ahead_count` prompts. Returns the passes run."""
        graphs = self._prefill_graphs()
        n, done, passes, lasts = len(rows), 0, 0, []
        idx = to_device(rows, self.device)
        st = self._st
        while done < n:
            if staged.left == 0:
                count = self._ahead_count(prompts, first + done, n - done)
                part = prompts[first + done: first + done + count]
                staged.cache, staged.last = prefill_pass(self.model, part, self.device, self.dtype, graphs.scratch,
                                                         graphs=graphs)
                staged.first, staged.n, staged.used = first + done, count, 0
                staged.lens = [len(p) for p in part]
                passes += 1
            assert staged.first + staged.used == first + done, "staged prompts out of order (engine bug)"
            k = min(n - done, staged.left)
            lo = staged.used
            copy_prefilled(st.cache, idx[done:done + k], staged.cache, lo, k, max(staged.lens[lo:lo + k]) - 1)
            lasts.append(staged.last[lo:lo + k])
            staged.used += k
            done += k
        self._refill(rows, list(prompts[first:first + n]), seeds, max_new_tokens,
                     last=lasts[0] if len(lasts) == 1 else torch.cat(lasts))
        return passes

    def _records(self, rows: list[int], prompts, seeds, which: list[int], mode: str) -> list[RowRecord]:
        """The records of engine rows `rows`, which hold prompts number `which` (one host copy of their rows)."""
        st = self._st
        ix = torch.tensor(rows, dtype=torch.long, device=self.device)
        out, n_out, n_ver, acc, fin = (x[ix].cpu() for x in (st.out, st.n_out, st.n_verify, st.acc, st.finish))
        per_pass = self.model.draft_passes_per_step if mode == "spec" else 0
        recs = []
        for j, (b, i) in enumerate(zip(rows, which)):
            nv = int(n_ver[j])
            rec = RowRecord(tokens=out[j, : int(n_out[j])].tolist(), prompt_len=len(prompts[i]), verify_passes=nv,
                            draft_passes=nv * per_pass, accepted=acc[j, :nv].tolist(),
                            finish_reason=FINISH[int(fin[j])], seed=seeds[i],
                            block_size=self.K if mode == "spec" else 1)
            if rec.finish_reason == "running":
                raise RuntimeError(f"row {b} (prompt {i}) ended without a finish reason (engine bug)")
            recs.append(rec)
        return recs

    def generate_many(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      sampling: SamplingParams | None = None, seeds: Sequence[int] | None = None,
                      eos_token_ids: Sequence[int] = (), mode: str = "spec", refill_min: int | None = None,
                      on_rows: Callable[[list[RowRecord]], None] | None = None) -> GenerateResult:
        """Decode any number of prompts with continuous batching: every `sync_every` steps the host harvests
        the rows that ended (end-of-sequence or `max_new_tokens`) and refills free rows with the next prompts, so
        a batch never waits for its longest row. Rows come back in the prompts' order; each row's tokens and
        records equal `generate`'s (per-row uniforms keyed by seed and verify pass; the same passes), whichever
        rows are refilled when.

        Prompts are prefilled ahead of their refill (`prefill_ahead_tokens`): one eager pass stages the next
        prompts in a scratch cache, and a refill whose prompts are staged only copies their cache rows.

        refill_min: None (default): the adaptive rule `should_refill`: a refill waits until the throughput lost to
          idle rows since the last refill reaches its measured cost (`self.refill_cost`, seconds, by kind: a copy of
          staged prompts, or one eager prefill pass, costing about the same for 1 row as for B; decode step seconds
          measured per call). An int: refill once that many rows are free (the fixed count rule). Both refill an
          idle batch at once.
        on_rows: called with each harvested group of records (progress display).
        prefill_s counts every prefill (the refills too, host-synchronized); decode_s the rest of the loop;
        refills the refills after the first fill; prefill_passes every prefill pass."""
        eos, seeds = self._check_call(prompts, max_new_tokens, seeds, eos_token_ids, mode, None)
        with self._fused():
            return self._generate_many(prompts, max_new_tokens, sampling, seeds, eos, mode, refill_min, on_rows)

    @torch.no_grad()
    def _generate_many(self, prompts, max_new_tokens, sampling, seeds, eos, mode, refill_min, on_rows):
        n = len(prompts)
        fixed_min = None if refill_min is None else max(1, int(refill_min))
        st = self._st
        sync, steps_fns = self._begin(mode, sampling)
        self._reserve_scratch(*self._call_scratch())
        replays = self.prefill_graph_replays
        t0 = time.perf_counter()
        prefill_s = 0.0
        self._reset(eos)
        owner: list[int | None] = [None] * self.B
        nxt, done = 0, 0
        records: list[RowRecord | None] = [None] * n
        steps = refills = passes = 0
        idle = 0  # row-steps spent idle since the last refill (free rows x steps of each window)
        window_s = 0.0  # seconds of the decode windows (host-synchronized), for the step time
        staged = _Staged()  # prompts prefilled ahead (prefill_ahead_tokens)
        while done < n:
            free = [b for b in range(self.B) if owner[b] is None]
            # what a refill now costs: a copy when its prompts are staged, else a pass (and a copy)
            kind = "copy" if staged.left >= min(len(free), n - nxt) else "pass"
            if fixed_min is not None:
                go = nxt < n and bool(free) and (len(free) >= fixed_min or len(free) == self.B)
            else:
                step_s = window_s / steps if steps else 0.0
                go = should_refill(len(free), self.B, idle, step_s, self.refill_cost.seconds(step_s, kind), n - nxt)
            if go:
                rows = free[: n - nxt]
                take = list(range(nxt, nxt + len(rows)))
                ta = time.perf_counter()
                ran = self._refill_staged(rows, prompts, nxt, [seeds[i] for i in take], max_new_tokens, staged)
                sync()
                dt = time.perf_counter() - ta
                prefill_s += dt
                passes += ran
                if nxt > 0:  # (the first fill of a call is not a refill the rule could have saved)
                    refills += 1
                    self.refill_cost.observe(dt, "pass" if ran else "copy")
                for b, i in zip(rows, take):
                    owner[b] = i
                nxt += len(rows)
                idle = 0
            n_free = sum(o is None for o in owner)
            tw = time.perf_counter()
            for _ in range(self.sync_every):
                for f in steps_fns:
                    f()
            steps += self.sync_every
            still = st.active.tolist()  # the host's one look per window (synchronizes)
            window_s += time.perf_counter() - tw
            idle += n_free * self.sync_every
            ended = [b for b in range(self.B) if owner[b] is not None and not still[b]]
            if not ended:
                continue
            which = [owner[b] for b in ended]
            group = self._records(ended, prompts, seeds, which, mode)
            for b, i, rec in zip(ended, which, group):
                records[i] = rec
                owner[b] = None
            done += len(ended)
            if on_rows is not None:
                on_rows(group)
            if steps > (n + self.B) * (max_new_tokens + self.sync_every):
                raise RuntimeError("continuous batching did not finish its prompts (engine bug)")
        sync()
        total = time.perf_counter() - t0
        return GenerateResult(list(records), mode, prefill_s, total - prefill_s, steps, self.B, self.cuda_graphs,
                              refills, passes, self.prefill_graph_replays - replays)

    def generate_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     sampling: SamplingParams | None = None, seeds: Sequence[int] | None = None,
                     eos_token_ids: Sequence[int] = (), mode: str = "spec") -> list[GenerateResult]:
        """`generate` over any number of prompts, `batch_size` at a time (in the given order)."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        out = []
        for i in range(0, len(prompts), self.B):
            out.append(self.generate(prompts[i:i + self.B], max_new_tokens, sampling, seeds[i:i + self.B],
                                     eos_token_ids, mode))
        return out


@dataclass
class HFResult:
    tokens: list[list[int]]
    seconds: float
    static_cache: bool  # whether a static cache was actually used
    note: str = ""
    per_batch_s: list[float] = field(default_factory=list)


@torch.no_grad()
def hf_generate(backbone, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                sampling: SamplingParams | None = None, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                batch_size: int = 1, static_cache: bool = True, seed: int = 0, compile: bool | None = None
                ) -> HFResult:
    """Reference: `transformers` `generate` on the frozen backbone (left-padded batches), for timing and
    for greedy agreement. Outputs are cut after the first end-of-sequence token, like the engine's.

    Exactly the given settings are used: the model's own generation_config (e.g. Qwen3's temperature 0.6,
    top-k 20, top-p 0.95, its eos ids), which transformers would merge into unset / default-valued fields, is
    swapped for a neutral one during the call. Pass the same eos ids as to the engine
    (`eval.benchmarks.stop_token_ids`).
    static_cache falls back to the dynamic cache (noted in the result) where the install lacks it.
    compile: None = transformers' default (it may torch.compile the forward for a static cache on CUDA: warm up
    before timing); False = never compile."""
    from transformers import GenerationConfig

    sp = sampling or SamplingParams()
    dev = next(backbone.parameters()).device
    eos = sorted({int(e) for e in eos_token_ids})
    kw = dict(max_new_tokens=max_new_tokens, do_sample=not sp.greedy, pad_token_id=pad_token_id,
              eos_token_id=eos or None)
    if not sp.greedy:
        kw.update(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p)  # top_k 0 = off, as here
        if sp.min_p > 0:
            kw["min_p"] = sp.min_p
    if compile is False:
        kw["disable_compile"] = True
    note = ""
    use_static = static_cache
    if use_static:
        kw["cache_implementation"] = "static"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tokens: list[list[int]] = []
    times = []
    saved_config = backbone.generation_config
    backbone.generation_config = GenerationConfig(pad_token_id=pad_token_id, eos_token_id=eos or None)
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[i:i + batch_size]]
            L = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), L), pad_token_id, dtype=torch.long)
            att = torch.zeros(len(chunk), L, dtype=torch.long)
            for b, p in enumerate(chunk):
                ids[b, L - len(p):] = torch.tensor(p)
                att[b, L - len(p):] = 1
            ids, att = ids.to(dev), att.to(dev)
            torch.manual_seed(seed + i)
            sync()
            t0 = time.perf_counter()
            try:
                out = backbone.generate(input_ids=ids, attention_mask=att, generation_config=GenerationConfig(**kw))
            except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
                if not use_static:
                    raise
                note = f"static cache unavailable ({e.__class__.__name__}: {str(e)[:200]}); used the dynamic cache"
                warnings.warn(note)
                use_static = False
                kw.pop("cache_implementation")
                sync()
                t0 = time.perf_counter()
                out = backbone.generate(input_ids=ids, attention_mask=att, generation_config=GenerationConfig(**kw))
            sync()
            times.append(time.perf_counter() - t0)
            for row in out[:, L:].tolist():
                cut = next((k for k, t in enumerate(row) if t in eos), None)
                tokens.append(row[: cut + 1] if cut is not None else row)
    finally:
        backbone.generation_config = saved_config
    return HFResult(tokens, sum(times), use_static, note, times)


# ============================================================================ plain generation (regeneration)
@dataclass(frozen=True)
class GenRequest:
    """One response to write: `key` comes back with it; `seed` drives its samples (counter-based: the
    tokens depend only on (seed, token index), not on the batch it rides in); `setting` indexes the
    `settings` of the `generate_stream` call."""
    key: object
    prompt: Sequence[int]
    seed: int = 0
    setting: int = 0


class _Snapshot:
    """Host copies of the per-row outputs after one decode window (double-buffered, pinned on CUDA)."""

    def __init__(self, B: int, width: int, pin: bool):
        kw = dict(dtype=torch.long, pin_memory=pin)
        self.out = torch.zeros(B, width, **kw)
        self.n_out = torch.zeros(B, **kw)
        self.active = torch.zeros(B, dtype=torch.bool, pin_memory=pin)
        self.event = None
        self.window = -1


class GenerationEngine:
    """Plain autoregressive generation (no drafts) on the frozen backbone, for regenerating training data at
    GPU speed: one static KV cache of `batch_size` rows, continuous batching, CUDA graphs.

    * Continuous batching: a row whose response ended (end-of-sequence or `max_new_tokens`) is refilled with
      the next prompt of the stream: the prompt minus its last token is prefilled into that row's cache slots
      (rows refilled together share one padded prefill, replayed as a CUDA graph beside the step's graphs:
      `prefill_graphs`), the batch keeps its fixed shape.
    * Fixed-shape decode step (one token per row), captured once per (cache width, sampling settings) as a
      CUDA graph and replayed `sync_every` times per window. Its attention reads only the first W slots of the
      cache, W the smallest multiple of `width_step` that holds every busy row for the next window: short
      prompts do not pay for the longest one (length bucketing without re-batching).
    * The host looks at the rows every `sync_every` steps, one window behind (the next window is already
      queued when it reads the last one's pinned copy), so the GPU never waits for the host; finished rows
      idle at most two windows.
    * Sampling per row: greedy or `SamplingParams` (temperature, top-k, top-p: the acceptance rule's own
      `verify.processed_logits`), with counter-based uniforms keyed by (request seed, token index): the
      same request gives the same tokens in any batch, order, refill pattern, graph or eager run.

    The model is any supported backbone (`model.backbones.FAMILIES`); its cached pass is the same code as the
    decode engine's (`DraftModel.ar_cached`). compile_step: torch.compile the step before capturing it (fewer,
    fused kernels for launch-bound models; costs compilation time, twice: the width becomes dynamic).
    prefill_graphs: with CUDA graphs, each refill's prefill passes replay a CUDA graph per padded shape
    (`PrefillGraphs`) instead of launching eagerly; ignored without CUDA graphs (the attribute can be changed
    between calls). Counts: `prefill_graph_replays`, `prefill_eager_passes`; `prefill_graph_error`.
    fused_argmax: when every sampling setting of a stream is greedy, the step takes each row's token straight from
    the final hidden state with one Triton kernel (`decode.lm_head`), without the logits; streams with a sampled
    setting keep the logits. As `DecodeEngine`'s: decided when the engine is built, `fused_argmax_error` (one
    warning, the unfused path) where it cannot run, `fused_argmax_active`; off by default (not yet run on a GPU)."""

    def __init__(self, backbone, batch_size: int, max_len: int, use_cuda_graphs: bool = True,
                 sync_every: int = 8, width_step: int = 128, refill_min: int | None = None,
                 prefill_tokens: int = 16384, compile_step: bool = False, fuse_projections: bool = True,
                 prefill_graphs: bool = True, fused_argmax: bool = False):
        if batch_size < 1 or sync_every < 1 or width_step < 1:
            raise ValueError("batch_size, sync_every and width_step must be >= 1")
        # a draft model without heads: only its cached AR pass is used (mask id 0 is never fed)
        self.model = DraftModel(backbone, block_size=2, mask_token_id=0, force_mask_token_id=True)
        self._fusion = DecodeFusion(self.model) if fuse_projections else None
        p = next(backbone.parameters())
        self.device, self.dtype = p.device, p.dtype
        prepare_decode_kernels(self.device)  # "auto" probes the kernels here, not in a compiled / captured step
        self.B, self.S = batch_size, max_len
        self.sync_every, self.width_step = sync_every, width_step
        # a refill is one eager prefill pass (launch-bound: about as many kernels as a decode step), so rows are
        # refilled in groups: fewer passes for a little idling (B/8 balanced the two in a cost model of a
        # 135M model at B=256; tune with scripts/bench_regen.py --refill-min)
        self.refill_min = max(1, batch_size // 8) if refill_min is None else max(1, refill_min)
        self.prefill_tokens = prefill_tokens
        self.cuda_graphs = bool(use_cuda_graphs and self.device.type == "cuda")
        self.graph_error: str | None = None
        self._graphs: dict = {}
        self._pool = None
        self.cache = self.model.new_cache(self.B, self.S, device=self.device, dtype=self.dtype)
        # the refills' prefill passes: scratch caches reused (nothing allocated or zero-filled per refill), and
        # their CUDA graphs
        self.prefill_graphs = bool(prefill_graphs)
        self._pg = PrefillGraphs(self.model, ScratchCache(self.model, self.device, self.dtype))
        self._views: dict[int, StaticKVCache] = {}
        z = dict(device=self.device, dtype=torch.long)
        self.last_token = torch.zeros(self.B, **z)
        self.seeds = torch.zeros(self.B, **z)
        self.setting = torch.zeros(self.B, **z)
        self.max_new = torch.zeros(self.B, **z)
        self.n_out = torch.zeros(self.B, **z)
        self.active = torch.zeros(self.B, device=self.device, dtype=torch.bool)
        self.eos = torch.full((16,), -1, **z)
        self.out = torch.zeros(self.B, 1, **z)
        self.steps = 0  # decode steps run (all calls)
        self.prefill_s = 0.0  # host seconds spent in refills (their passes are launch-bound: about their cost)
        self.refills = 0  # refills run (each one prefill of the rows refilled together, in chunks of prefill_tokens)
        self._settings: tuple = ()
        # dynamic=None: the first width compiles static, the second makes the width dynamic (two compiles in all)
        self.compile_error: str | None = None  # set where the compiled step fell back to eager
        self._compiled = CompiledOrEager(self, self._step, dynamic=None) if compile_step else None
        self.fused_argmax = bool(fused_argmax)
        self.fused_argmax_error: str | None = None
        self._argmax = None
        if self.fused_argmax:  # the step hands over (B, H) rows of its (B, 1, H) pass
            self._argmax, self.fused_argmax_error = resolve_fused_argmax(self.model, [(1, self.B, self.B)])
            if self.fused_argmax_error:
                warnings.warn(f"fused_argmax: the fused greedy LM head cannot run here ({self.fused_argmax_error}); "
                              "using the LM head's logits and argmax")

    @property
    def fused_argmax_active(self) -> bool:
        """Whether greedy streams take their tokens from the fused greedy LM head (else `fused_argmax_error`)."""
        return self._argmax is not None

    def _step_fn(self, W: int) -> None:
        (self._compiled or self._step)(W)

    def _prefill_graphs(self) -> PrefillGraphs:
        self._pg.enabled = self.cuda_graphs and self.prefill_graphs
        return self._pg

    @property
    def prefill_graph_replays(self) -> int:
        """Prefill passes that replayed a CUDA graph (every call so far, warm-ups included)."""
        return self._pg.replays

    @property
    def prefill_eager_passes(self) -> int:
        """Prefill passes that ran eagerly (every call so far, warm-ups included)."""
        return self._pg.eager

    @property
    def prefill_graph_error(self) -> str | None:
        """Why a prefill pass's capture failed (prefill passes then run eagerly); None otherwise."""
        return self._pg.error

    # ------------------------------------------------------------------------------- the step
    def _view(self, W: int) -> StaticKVCache:
        if W not in self._views:
            c = self.cache
            self._views[W] = StaticKVCache([k[:, :, :W] for k in c.k], [v[:, :, :W] for v in c.v], c.lengths)
        return self._views[W]

    def _step(self, W: int) -> None:
        """One token for every row (fixed shapes; rows that are not active change nothing that is read)."""
        cache = self._view(W)
        h = self.model.ar_cached(self.last_token[:, None], cache)[:, 0]
        if self._argmax is not None and all(sp.greedy for sp in self._settings):  # no logits (fused_argmax)
            tok = self._argmax(h, self.model.lm_weight())
        else:
            logits = self.model.logits(h)
            tok = logits.argmax(-1)
            for i, sp in enumerate(self._settings):
                if not sp.greedy:
                    u = counter_uniforms(self.seeds, self.n_out, 0, 1)[:, 0]
                    tok = torch.where(self.setting == i, verify.inverse_cdf(draft_probs(logits, sp), u), tok)
        act = self.active
        sink = self.out.shape[1] - 1
        self.out.scatter_(1, torch.where(act, self.n_out, sink)[:, None], tok[:, None])
        self.n_out.add_(act.long())
        done = (tok[:, None] == self.eos).any(-1) | (self.n_out >= self.max_new)
        cache.lengths.add_(act.long())  # x_a is committed; the sampled token is the next x_a
        self.last_token.copy_(torch.where(act, tok, self.last_token))
        self.active.copy_(act & ~done)

    def _window_fn(self, W: int):
        """`sync_every` steps at width W: replays of the step's CUDA graph (captured on first use), or eager."""
        if self.cuda_graphs:
            key = (W, self._settings)
            if key not in self._graphs:
                try:
                    self._graphs[key] = self._capture(W)
                except Exception as e:  # noqa: BLE001 - e.g. a model with host syncs: decode eagerly
                    self.graph_error = f"{e.__class__.__name__}: {str(e)[:500]}"
                    warnings.warn(f"CUDA graph capture failed ({self.graph_error}); generating eagerly")
                    self.cuda_graphs = False
                    _drop_graphs(self)
                    self._pg.drop()  # prefill graphs replay only beside the step graphs: free their pool
        if self.cuda_graphs:
            g = self._graphs[(W, self._settings)]
            return lambda: [g.replay() for _ in range(self.sync_every)]
        return lambda: [self._step_fn(W) for _ in range(self.sync_every)]

    def _capture(self, W: int):
        """One step at width W as a CUDA graph (one step, not a window: a new width costs one capture)."""
        state = [self.last_token, self.n_out, self.active, self.out, self.cache.lengths]
        saved = [t.clone() for t in state]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            self._step_fn(W)  # warm-up outside the graph (kernel selection, compilation)
        torch.cuda.current_stream().wait_stream(s)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g, pool=self._pool):
            self._step_fn(W)
        for t, v in zip(state, saved):  # the warm-up moved the state; K/V it wrote lie past every length
            t.copy_(v)
        return g

    # ------------------------------------------------------------------------------- refill
    def _prefill(self, rows: list[int], reqs: list[GenRequest], max_new_tokens: int) -> None:
        """Cache each prompt minus its last token in its row (slots 0..P-2); arm the row."""
        t0 = time.perf_counter()
        lens = [len(r.prompt) for r in reqs]
        graphs = self._prefill_graphs()
        prefill_rows(self.model, self.cache, rows, [r.prompt for r in reqs], self.prefill_tokens, graphs.scratch,
                     graphs=graphs)
        idx = to_device(rows, self.device)

        def put(t, values, dtype=torch.long):
            t[idx] = to_device(values, self.device, dtype)

        put(self.cache.lengths, [n - 1 for n in lens])
        put(self.last_token, [int(r.prompt[-1]) for r in reqs])
        put(self.seeds, [int(r.seed) & ((1 << 63) - 1) for r in reqs])
        put(self.setting, [int(r.setting) for r in reqs])
        put(self.max_new, [max_new_tokens] * len(rows))
        put(self.n_out, [0] * len(rows))
        put(self.active, [True] * len(rows), torch.bool)
        self.prefill_s += time.perf_counter() - t0
        self.refills += 1

    # ------------------------------------------------------------------------------- the stream
    @torch.no_grad()
    def generate_stream(self, requests, max_new_tokens: int, settings: Sequence[SamplingParams] = (SamplingParams(),),
                        eos_token_ids: Sequence[int] = ()):
        """Yield (key, tokens) for every request of the iterable, in completion order. tokens: the new tokens,
        ending with (and including) the first end-of-sequence token, or `max_new_tokens` long."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = sorted({int(e) for e in eos_token_ids})
        if len(eos) > self.eos.numel():
            raise ValueError(f"at most {self.eos.numel()} end-of-sequence ids, got {eos}")
        self._settings = tuple(settings)
        if self._fusion is not None and self._fusion.refresh():  # parameters moved since: refuse, recapture
            _drop_graphs(self)
            self._pg.drop()
        with self._fusion or contextlib.nullcontext():
            yield from self._stream(requests, max_new_tokens, eos)

    @contextlib.contextmanager
    def _detached(self):
        if self._fusion is not None:
            self._fusion.__exit__(None, None, None)
        try:
            yield
        finally:
            if self._fusion is not None:
                self._fusion.__enter__()

    def _stream(self, requests, max_new_tokens: int, eos: list[int]):
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # graphs, streams and events of this engine live on its device
        self.eos.fill_(-1)
        if eos:
            self.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        if self.out.shape[1] != max_new_tokens + 1:  # last column: sink of inactive rows' writes
            self.out = torch.zeros(self.B, max_new_tokens + 1, device=self.device, dtype=torch.long)
            _drop_graphs(self)
        self.active.zero_()
        graphs = self._prefill_graphs()
        if graphs.enabled and graphs.error is None:  # the largest pass a refill can run, at once (a growth of the
            rows, Lp = prefill_shape(self.B, self.S)  # scratch drops every prefill graph)
            graphs.scratch.reserve(min(self.prefill_tokens or rows * Lp, rows * Lp), rows)
        pin = self.device.type == "cuda"
        snaps = [_Snapshot(self.B, max_new_tokens + 1, pin) for _ in range(2)]
        queue = iter(requests)
        pending: list[GenRequest] = []  # requests taken from the iterable but not yet placed

        def take(n: int) -> list[GenRequest]:
            while len(pending) < n:
                r = next(queue, None)
                if r is None:
                    break
                if not 1 <= len(r.prompt) or not 0 <= r.setting < len(self._settings):
                    raise ValueError(f"request {r.key!r}: empty prompt or setting {r.setting} not in "
                                     f"0..{len(self._settings) - 1}")
                if len(r.prompt) + max_new_tokens > self.S:
                    raise ValueError(f"request {r.key!r}: prompt of {len(r.prompt)} tokens + max_new_tokens="
                                     f"{max_new_tokens} needs {len(r.prompt) + max_new_tokens} cache slots; the "
                                     f"engine has max_len={self.S}")
                pending.append(r)
            got = pending[:n]
            del pending[:n]
            return got

        owner: list[GenRequest | None] = [None] * self.B  # request riding in each row
        since: list[int] = [0] * self.B  # first window the row's request rides in
        ub = [0] * self.B  # cache length of the row after the windows launched so far (exact while active)
        window, prev = 0, None
        while True:
            free = [b for b in range(self.B) if owner[b] is None]
            busy = self.B - len(free)
            if free and (len(free) >= self.refill_min or busy == 0):
                got = take(len(free))
                if got:
                    rows = free[: len(got)]
                    self._prefill(rows, got, max_new_tokens)
                    for b, r in zip(rows, got):
                        owner[b], since[b], ub[b] = r, window, len(r.prompt) - 1
                    busy += len(got)
            snap = None
            if busy:
                top = max(ub[b] for b in range(self.B) if owner[b] is not None) + self.sync_every + 1
                W = min(self.S, -(-top // self.width_step) * self.width_step)
                self._window_fn(W)()
                self.steps += self.sync_every
                for b in range(self.B):
                    if owner[b] is not None:
                        ub[b] += self.sync_every
                snap = snaps[window % 2]
                snap.window = window
                snap.out.copy_(self.out, non_blocking=pin)
                snap.n_out.copy_(self.n_out, non_blocking=pin)
                snap.active.copy_(self.active, non_blocking=pin)
                if pin:
                    snap.event = torch.cuda.Event()
                    snap.event.record()
                window += 1
            if prev is not None:  # the window before: its rows that ended are harvested and freed
                if prev.event is not None:
                    prev.event.synchronize()
                still, n_out = prev.active.tolist(), prev.n_out.tolist()
                for b in range(self.B):
                    r = owner[b]
                    if r is not None and since[b] <= prev.window and not still[b]:
                        owner[b] = None
                        with self._detached():  # the fused weights are attached only while this engine works
                            yield r.key, prev.out[b, : n_out[b]].tolist()
            prev = snap
            if snap is None and all(o is None for o in owner):
                if take(1):
                    raise RuntimeError("generation engine: requests left with no row busy (engine bug)")
                return

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams | None = None,
                 seeds: Sequence[int] | None = None, eos_token_ids: Sequence[int] = ()) -> list[list[int]]:
        """Responses to `prompts` in order (any number of prompts: rows are refilled)."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        reqs = [GenRequest(i, p, s) for i, (p, s) in enumerate(zip(prompts, seeds))]
        out: list[list[int]] = [[] for _ in prompts]
        for i, toks in self.generate_stream(reqs, max_new_tokens, (sampling or SamplingParams(),), eos_token_ids):
            out[i] = toks
        return out
