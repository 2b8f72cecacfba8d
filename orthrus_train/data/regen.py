"""Regeneration: the frozen backbone writes the training responses.

`Generator` is the only thing the stage needs from a decoder: token lists in, response token lists out.
`HFGenerator` implements it on `model.generate`; `EngineGenerator` on the project's own decode engine
(`decode.engine.GenerationEngine`: static cache, CUDA graphs, continuous batching). A generator with
`streaming = True` also takes the whole work of a rank as one stream of requests (`generate_stream`), so
its rows are refilled across batches and shards and the GPU never waits for a batch's longest response.

`samples_per_prompt` = N makes N rounds over the prompts: round 0 decodes with `temperature` (greedy by
default; a temperature > 0 samples with the generation config's top-k / top-p), rounds 1..N-1 sample with
`sampling` (the target's generation config: temperature, top-k, top-p). Shard s is prompt shard
s % n_shards of round s // n_shards; round 0's shards are exactly those of a one-sample run.

`regenerate` splits the prompts into shards of `shard_size` (in prompt order); rank r of world w takes
shards r, r+w, ... Inside a shard, prompts are sorted by length, longest first, into batches (left-padded
by the generator), and the responses are put back in prompt order. A shard is written to a temporary file and
renamed when complete, so after a crash (even kill -9) a restart skips every finished shard and redoes
only the others; each batch's sampling seed depends only on (seed, shard, batch) (a streaming generator's:
on (seed, shard, prompt)), so an interrupted and resumed run writes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 seed: int = 0) -> list[list[int]]:
        """One response per prompt: the new tokens only, ending with (and including) the first end-of-sequence
        token, or `max_new_tokens` long when none came. temperature 0 is greedy; > 0 samples with `seed`."""
        ...


def cut_at_eos(tokens: Sequence[int], eos_ids: set[int], limit: int) -> list[int]:
    out = []
    for t in list(tokens)[:limit]:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


class HFGenerator:
    """`Generator` on top of a transformers causal LM's `generate` (static KV cache where supported)."""

    def __init__(self, model: Any, eos_token_ids: Sequence[int], pad_token_id: int, static_cache: bool = True,
                 pad_to_multiple_of: int = 64, compile: bool | None = None):
        """pad_to_multiple_of: left-pad prompts to a multiple of this width, so batches share few shapes.
        compile: None lets transformers decide (it compiles the static-cache decode step on CUDA);
        False turns that off."""
        self.model = model.eval()
        self.compile = compile
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids})
        if not self.eos_token_ids:
            raise ValueError("HFGenerator needs at least one eos token id to stop generation")
        self.pad_token_id = int(pad_token_id)
        self.static_cache = static_cache
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)

    def _config(self, max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0):
        from transformers import GenerationConfig

        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False)
        # Explicit sampling knobs: the model's own defaults (e.g. Qwen3's top_k=20) must not leak in.
        return GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=0, repetition_penalty=1.0, num_beams=1,
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
            cache_implementation="static" if self.static_cache else None,
            **({"disable_compile": True} if self.compile is False else {}), **sampling,
        )

    def sampling_defaults(self) -> tuple[float, int, float]:
        return generation_sampling(self.model)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 seed: int = 0, top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
        import torch

        if not prompts:
            return []
        m = self.pad_to_multiple_of
        width = -(-max(len(p) for p in prompts) // m) * m
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding: every prompt ends at the same column
            if len(p):
                ids[r, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
                attn[r, width - len(p):] = 1
        device = next(self.model.parameters()).device
        ids, attn = ids.to(device), attn.to(device)
        while True:
            if temperature > 0:
                torch.manual_seed(seed)
            try:
                with torch.inference_mode():
                    out = self.model.generate(input_ids=ids, attention_mask=attn,
                                              generation_config=self._config(max_new_tokens, temperature, top_k, top_p))
                break
            except (ValueError, NotImplementedError, TypeError) as e:
                if not self.static_cache:
                    raise
                warnings.warn(f"static KV cache not supported by {type(self.model).__name__} ({e}); "
                              "falling back to the dynamic cache", stacklevel=2)
                self.static_cache = False
        eos = set(self.eos_token_ids)
        return [cut_at_eos(row, eos, max_new_tokens) for row in out[:, width:].tolist()]


def generation_sampling(model: Any) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) of the model's generation config, for sampled responses: its temperature
    (1.0 when unset or 0), top_k (0 = off) and top_p (1.0 = off) when set."""
    gc = getattr(model, "generation_config", None)
    t = getattr(gc, "temperature", None)
    k = getattr(gc, "top_k", None)
    p = getattr(gc, "top_p", None)
    return (float(t) if t else 1.0, int(k) if k else 0, float(p) if p else 1.0)


class EngineGenerator:
    """`Generator` on the project's decode engine (`decode.engine.GenerationEngine`): a static KV cache of
    `batch_size` rows, CUDA graphs on CUDA, rows refilled as responses end (`streaming`: `regenerate` hands it
    all of a rank's work at once). Sampling uses counter-based uniforms keyed by (seed, prompt, token index),
    so a response does not depend on the batch it was decoded in."""

    streaming = True

    def __init__(self, model: Any, eos_token_ids: Sequence[int], batch_size: int = 256,
                 use_cuda_graphs: bool = True, compile_steps: Any = "auto", compile_min_steps: int | None = None,
                 compile_cache: Any = None, **engine_kw: Any):
        """engine_kw: GenerationEngine options (sync_every, width_step, refill_min, prefill_tokens, prefill_graphs,
        fused_argmax).
        compile_steps: auto | true | false, decided per call from the decode steps ahead
        (`decode/compile_policy.py`); the decision is kept in `compile_info`. compile_cache: the on-disk
        cache folder for compiled kernels (set only when compiling; a user's TORCHINDUCTOR_CACHE_DIR wins)."""
        from ..decode import compile_policy
        from ..model.backbones import family_of

        if "compile_step" in engine_kw:  # GenerationEngine's own spelling: the same as compile_steps=true/false
            compile_steps = bool(engine_kw.pop("compile_step"))

        family_of(model.config)  # a clear refusal for families the engine does not implement
        self.model = model.eval()
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids})
        if not self.eos_token_ids:
            raise ValueError("EngineGenerator needs at least one eos token id to stop generation")
        self.batch_size, self.use_cuda_graphs, self.engine_kw = batch_size, use_cuda_graphs, engine_kw
        self.compile_steps = compile_policy.normalize(compile_steps)
        self.compile_min_steps = compile_policy.DEFAULT_MIN_STEPS if compile_min_steps is None else compile_min_steps
        self.compile_cache = compile_cache
        self._compile_info: dict | None = None
        self._retired: dict = {}  # counts of engines replaced by a larger one (engine_stats)
        self.engine = None

    def sampling_defaults(self) -> tuple[float, int, float]:
        return generation_sampling(self.model)

    def _engine_for(self, slots: int):
        from ..decode.engine import GenerationEngine

        step = self.engine_kw.get("width_step", 128)
        slots = -(-slots // step) * step
        compile_step = bool(self._compile_info and self._compile_info["used"])
        if self.engine is None or self.engine.S < slots or (self.engine._compiled is not None) != compile_step:
            self._retire()
            self.engine = None  # free the old cache first
            self.engine = GenerationEngine(self.model, self._fit_batch(slots), slots,
                                           use_cuda_graphs=self.use_cuda_graphs, compile_step=compile_step,
                                           **self.engine_kw)
        return self.engine

    def _decide_compile(self, n_requests: int, max_new_tokens: int) -> None:
        """Compile the step when this call's decode work earns it back (one decision per call, reported)."""
        from ..decode import compile_policy

        p = next(self.model.parameters())
        est = -(-n_requests // self.batch_size) * max_new_tokens
        info = compile_policy.decide(self.compile_steps, p.is_cuda and self.use_cuda_graphs, est,
                                     self.compile_min_steps)
        if info["used"] and self.compile_cache is not None:
            info["cache_dir"] = compile_policy.use_cache_dir(self.compile_cache)
        if self._compile_info is None or info["used"] != self._compile_info["used"]:
            print(f"[data] compiled decode step: {'yes' if info['used'] else 'no'} ({info['reason']})", flush=True)
        self._compile_info = info

    @staticmethod
    def _counts(e) -> dict:
        return {"decode_steps": e.steps, "refills": e.refills, "refill_host_seconds": e.prefill_s,
                "prefill_graph_replays": e.prefill_graph_replays}

    def _retire(self) -> None:
        """Keep the counts of an engine about to be replaced (engine_stats covers every engine of the run)."""
        if self.engine is not None:
            for k, v in self._counts(self.engine).items():
                self._retired[k] = self._retired.get(k, 0) + v

    @property
    def engine_stats(self) -> dict | None:
        """What the engines of this process ran: decode steps, refills (prefill passes of the rows refilled
        together) and the host seconds those refills took (launch-bound passes: about their cost), and the prefill
        passes that replayed a CUDA graph; with data.fused_argmax, whether the current engine runs the fused greedy
        LM head ("fused_argmax") or why not ("fused_argmax_error"). None before any generation."""
        if self.engine is None and not self._retired:
            return None
        now = self._counts(self.engine) if self.engine is not None else {}
        out = {k: self._retired.get(k, 0) + now.get(k, 0) for k in (now or self._retired)}
        out["refill_host_seconds"] = round(out["refill_host_seconds"], 3)
        if self.engine is not None and self.engine.fused_argmax:  # data.fused_argmax: whether it ran, else why not
            out["fused_argmax"] = self.engine.fused_argmax_active
            if self.engine.fused_argmax_error:
                out["fused_argmax_error"] = self.engine.fused_argmax_error
        return out

    @property
    def compile_info(self) -> dict | None:
        """The last call's compile decision; "error" where compilation failed and the step ran uncompiled."""
        err = getattr(self.engine, "compile_error", None)
        return self._compile_info if not (err and self._compile_info) else {**self._compile_info, "error": err}

    def _fit_batch(self, slots: int) -> int:
        """batch_size, lowered (with a warning) where its KV cache would take more than half the free memory."""
        import torch

        p = next(self.model.parameters())
        if p.device.type != "cuda":
            return self.batch_size
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        per_row = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * slots * p.element_size()
        free = torch.cuda.mem_get_info(p.device)[0]
        fit = max(1, int(0.5 * free // per_row))
        if fit < self.batch_size:
            warnings.warn(f"data.batch_size={self.batch_size}: a KV cache of {slots} slots per row fits "
                          f"{fit} rows in half the free GPU memory; using {fit}", stacklevel=2)
            return fit
        return self.batch_size

    def generate_stream(self, requests: Sequence[Any], max_new_tokens: int, settings: Sequence[Any]):
        """Yield (key, tokens) per `decode.engine.GenRequest`, in completion order."""
        if not requests:
            return iter(())
        longest = max(len(r.prompt) for r in requests)
        self._decide_compile(len(requests), max_new_tokens)
        return self._engine_for(longest + max_new_tokens).generate_stream(
            requests, max_new_tokens, settings, self.eos_token_ids)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 seed: int = 0, top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
        from ..decode.engine import GenRequest, SamplingParams
        from ..decode.rng import row_seed

        reqs = [GenRequest(i, list(p), row_seed(seed, i)) for i, p in enumerate(prompts)]
        out: list[list[int]] = [[] for _ in prompts]
        for i, toks in self.generate_stream(reqs, max_new_tokens, [SamplingParams(temperature, top_k, top_p)]):
            out[i] = toks
        return out


def eos_ids_for(model: Any, tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    """End-of-sequence ids: the model's generation config, the tokenizer's eos, and `extra`."""
    ids = set(int(t) for t in extra)
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if src is not None:
            ids.update(int(t) for t in (src if isinstance(src, (list, tuple)) else [src]))
    return sorted(ids)


def rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else the launcher's (RANK / WORLD_SIZE, Slurm array tasks: launch/dist_env.py)."""
    if rank is None or world_size is None:
        from ..launch.dist_env import resolve_data_shard

        shard = resolve_data_shard()
        rank = shard.index if rank is None else rank
        world_size = shard.count if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


# ------------------------------------------------------------------------------------------ sharded runner


@dataclass
class RegenStats:
    shards: int
    shards_done: int        # written by this call
    shards_skipped: int     # already finished before this call
    prompts: int            # prompts generated by this call
    new_tokens: int         # tokens generated by this call
    seconds: float          # generation time of this call
    total_new_tokens: int   # over every finished shard of this rank, this call or earlier
    total_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.total_new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


def _shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard-{k:05d}.json"


def _batch_seed(seed: int, shard: int, batch: int) -> int:
    h = hashlib.sha256(f"{seed}/{shard}/{batch}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def prompts_fingerprint(prompts: Sequence[Sequence[int]], **params: Any) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for p in prompts:
        h.update(json.dumps(list(p)).encode())
    return h.hexdigest()[:16]


def _check_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    path = out_dir / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != meta:
            raise RuntimeError(
                f"{out_dir} holds responses for other prompts or settings (meta.json {old} != {meta}); "
                f"delete {out_dir} to regenerate, or use another run directory")
        return
    tmp = out_dir / f"meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, sort_keys=True))
    os.replace(tmp, path)


def _write_shard(out_dir: Path, k: int, lo: int, responses: list[list[int]], seconds: float) -> int:
    """Write shard k atomically (only this rank writes it; a killed run's temp file is overwritten)."""
    tokens = sum(len(r) for r in responses)
    tmp = out_dir / f".shard-{k:05d}.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"shard": k, "start": lo, "responses": responses, "new_tokens": tokens, "seconds": seconds}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, _shard_path(out_dir, k))
    return tokens


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        ps = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in ps or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values())


def sampling_defaults_of(generator: Any) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) the generator samples extra responses with by default (its target's
    generation config); plain sampling (1.0, 0, 1.0) for a generator that states none."""
    return getattr(generator, "sampling_defaults", lambda: (1.0, 0, 1.0))()


def regenerate(prompts: Sequence[Sequence[int]], generator: Generator, out_dir: str | os.PathLike, *,
               max_new_tokens: int, temperature: float = 0.0, seed: int = 0, batch_size: int = 32,
               shard_size: int = 512, rank: int | None = None, world_size: int | None = None,
               progress: bool = True, samples_per_prompt: int = 1,
               sampling: tuple[float, int, float] | None = None) -> RegenStats:
    """Write the responses of this rank's shards under out_dir (skipping finished ones).

    samples_per_prompt: N rounds; round 0 decodes with `temperature` (0: greedy; > 0: sampled at that temperature
    with the top-k / top-p of `sampling`), rounds >= 1 sample with `sampling` = (temperature, top_k, top_p), by
    default the generator's `sampling_defaults()` (the target's generation config)."""
    if not isinstance(generator, Generator):
        raise TypeError(f"{type(generator).__name__} does not implement Generator.generate")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    rank, world_size = rank_world(rank, world_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                  shard_size=shard_size, batch_size=batch_size)
    if samples_per_prompt > 1 or temperature > 0:  # greedy one-sample folders keep the meta they always had
        if sampling is None:
            sampling = sampling_defaults_of(generator)
        params["sampling"] = list(sampling)
    if samples_per_prompt > 1:
        params["samples_per_prompt"] = samples_per_prompt
    _check_meta(out_dir, {"n_prompts": len(prompts), "fingerprint": prompts_fingerprint(prompts, **params),
                          **params})
    per_round = -(-len(prompts) // shard_size)
    n_shards = per_round * samples_per_prompt
    mine = list(range(rank, n_shards, world_size))
    todo = [k for k in mine if not _shard_path(out_dir, k).exists()]
    skipped = len(mine) - len(todo)

    def shard_prompts(k: int) -> tuple[int, list[list[int]]]:
        lo = (k % per_round) * shard_size
        return lo, [list(p) for p in prompts[lo:lo + shard_size]]

    def round_sampling(k: int) -> tuple[float, int, float]:
        if k >= per_round:
            return tuple(sampling)  # type: ignore[arg-type]
        # round 0: greedy, or sampled at `temperature` with the generation config's top-k / top-p
        return (temperature, 0, 1.0) if temperature == 0 else (temperature, sampling[1], sampling[2])

    from tqdm.auto import tqdm

    n_todo = sum(len(shard_prompts(k)[1]) for k in todo)
    bar = tqdm(total=n_todo, unit="prompt", desc=f"regenerate (rank {rank}/{world_size})", disable=not progress)
    t_start = time.perf_counter()
    if todo and getattr(generator, "streaming", False):
        new_tokens = _regenerate_stream(generator, todo, shard_prompts, round_sampling, out_dir, bar,
                                        max_new_tokens=max_new_tokens, seed=seed)
    else:
        new_tokens = 0
        for k in todo:
            lo, shard = shard_prompts(k)
            t, top_k, top_p = round_sampling(k)
            extra = {}
            if t > 0 and (top_k or top_p < 1.0):
                if _accepts(generator.generate, "top_k"):
                    extra = dict(top_k=top_k, top_p=top_p)
                else:
                    warnings.warn(f"{type(generator).__name__} takes no top_k/top_p: sampling at temperature {t} "
                                  f"without top-k {top_k} / top-p {top_p}", stacklevel=2)
            # length buckets, longest first: a memory problem shows at once, and a static cache sized by the
            # first (largest) batch is reused by the later ones instead of growing (and recompiling) each time
            order = sorted(range(len(shard)), key=lambda j: (-len(shard[j]), j))
            responses: list[list[int]] = [[] for _ in shard]
            t0 = time.perf_counter()
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                outs = generator.generate([shard[j] for j in idx], max_new_tokens, temperature=t,
                                          seed=_batch_seed(seed, k, b // batch_size), **extra)
                if len(outs) != len(idx):
                    raise RuntimeError(f"generator returned {len(outs)} responses for {len(idx)} prompts")
                for j, r in zip(idx, outs):
                    responses[j] = [int(x) for x in r]
                bar.update(len(idx))
                done = new_tokens + sum(map(len, responses))
                bar.set_postfix(tok_s=f"{done / max(time.perf_counter() - t_start, 1e-9):.0f}")
            new_tokens += _write_shard(out_dir, k, lo, responses, time.perf_counter() - t0)
    seconds = time.perf_counter() - t_start
    bar.close()
    total_tokens, total_seconds = 0, 0.0
    for k in mine:
        d = json.loads(_shard_path(out_dir, k).read_text())
        total_tokens += d["new_tokens"]
        total_seconds += d["seconds"]
    return RegenStats(n_shards, len(todo), skipped, n_todo, new_tokens, seconds, total_tokens, total_seconds)


def _regenerate_stream(generator: Any, todo: list[int], shard_prompts, round_sampling, out_dir: Path, bar, *,
                       max_new_tokens: int, seed: int) -> int:
    """Every todo shard as one stream of requests (longest prompt first within a shard); a shard is written
    as soon as its last response is in, its `seconds` being the time since the previous shard was written."""
    from ..decode.engine import GenRequest, SamplingParams
    from ..decode.rng import row_seed

    settings: list[tuple[float, int, float]] = []
    requests, buffers, left, starts = [], {}, {}, {}
    for k in todo:
        lo, shard = shard_prompts(k)
        sp = round_sampling(k)
        if sp not in settings:
            settings.append(sp)
        order = sorted(range(len(shard)), key=lambda j: (-len(shard[j]), j))
        requests += [GenRequest((k, j), shard[j], row_seed(seed, k, j), settings.index(sp)) for j in order]
        buffers[k], left[k], starts[k] = [None] * len(shard), len(shard), lo
    new_tokens, t_last, t0 = 0, time.perf_counter(), time.perf_counter()
    stream = generator.generate_stream(requests, max_new_tokens, [SamplingParams(*sp) for sp in settings])
    for (k, j), toks in stream:
        buffers[k][j] = [int(x) for x in toks]
        left[k] -= 1
        bar.update(1)
        if left[k] == 0:
            now = time.perf_counter()
            new_tokens += _write_shard(out_dir, k, starts[k], buffers.pop(k), now - t_last)
            t_last = now
            bar.set_postfix(tok_s=f"{new_tokens / max(now - t0, 1e-9):.0f}")
    if buffers:
        raise RuntimeError(f"the generator's stream ended with shards {sorted(buffers)[:10]} unfinished")
    return new_tokens


def missing_shards(out_dir: str | os.PathLike, n_prompts: int, shard_size: int, samples_per_prompt: int = 1
                   ) -> list[int]:
    n_shards = -(-n_prompts // shard_size) * samples_per_prompt
    return [k for k in range(n_shards) if not _shard_path(Path(out_dir), k).exists()]


def load_responses(out_dir: str | os.PathLike, n_prompts: int, shard_size: int, samples_per_prompt: int = 1
                   ) -> tuple[list[list[int]], dict]:
    """All responses in prompt order (round after round: response r of prompt i at r * n_prompts + i), and the
    summed generation stats of every shard (all ranks)."""
    out_dir = Path(out_dir)
    missing = missing_shards(out_dir, n_prompts, shard_size, samples_per_prompt)
    if missing:
        raise FileNotFoundError(f"{out_dir}: shards {missing[:10]}{'...' if len(missing) > 10 else ''} are not "
                                "finished; run the regeneration on every rank (or rerun to resume)")
    responses: list[list[int]] = []
    tokens, seconds = 0, 0.0
    for k in range(-(-n_prompts // shard_size) * samples_per_prompt):
        d = json.loads(_shard_path(out_dir, k).read_text())
        assert d["start"] == len(responses) % max(n_prompts, 1), f"{_shard_path(out_dir, k)} starts at {d['start']}"
        responses.extend(d["responses"])
        tokens += d["new_tokens"]
        seconds += d["seconds"]
    return responses, {"new_tokens": tokens, "seconds": seconds,
                       "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}
