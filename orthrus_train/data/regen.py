"""Regeneration: the frozen backbone writes the training responses.

`Generator` is the only thing the stage needs from a decoder: token lists in, response token lists out.
`HFGenerator` implements it on `model.generate`; the project's own static-cache engine can replace it
behind the same protocol.

`regenerate` splits the prompts into shards of `shard_size` (in prompt order); rank r of world w takes
shards r, r+w, ... Inside a shard, prompts are sorted by length, longest first, into batches (left-padded
by the generator), and the responses are put back in prompt order. A shard is written to a temporary file and
renamed when complete, so after a crash (even kill -9) a restart skips every finished shard and redoes
only the others; each batch's sampling seed depends only on (seed, shard, batch), so an interrupted and
resumed run writes exactly what an uninterrupted one does.
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

    def _config(self, max_new_tokens: int, temperature: float):
        from transformers import GenerationConfig

        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        # Explicit sampling knobs: the model's own defaults (e.g. Qwen3's top_k=20) must not leak in.
        return GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=0, repetition_penalty=1.0, num_beams=1,
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
            cache_implementation="static" if self.static_cache else None,
            **({"disable_compile": True} if self.compile is False else {}), **sampling,
        )

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 seed: int = 0) -> list[list[int]]:
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
                                              generation_config=self._config(max_new_tokens, temperature))
                break
            except (ValueError, NotImplementedError, TypeError) as e:
                if not self.static_cache:
                    raise
                warnings.warn(f"static KV cache not supported by {type(self.model).__name__} ({e}); "
                              "falling back to the dynamic cache", stacklevel=2)
                self.static_cache = False
        eos = set(self.eos_token_ids)
        return [cut_at_eos(row, eos, max_new_tokens) for row in out[:, width:].tolist()]


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


def regenerate(prompts: Sequence[Sequence[int]], generator: Generator, out_dir: str | os.PathLike, *,
               max_new_tokens: int, temperature: float = 0.0, seed: int = 0, batch_size: int = 32,
               shard_size: int = 512, rank: int | None = None, world_size: int | None = None,
               progress: bool = True) -> RegenStats:
    """Write the responses of this rank's shards under out_dir (skipping finished ones)."""
    if not isinstance(generator, Generator):
        raise TypeError(f"{type(generator).__name__} does not implement Generator.generate")
    rank, world_size = rank_world(rank, world_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, shard_size=shard_size,
                  batch_size=batch_size)
    _check_meta(out_dir, {"n_prompts": len(prompts), "fingerprint": prompts_fingerprint(prompts, **params),
                          **params})
    n_shards = -(-len(prompts) // shard_size)
    mine = list(range(rank, n_shards, world_size))
    todo = [k for k in mine if not _shard_path(out_dir, k).exists()]
    skipped = len(mine) - len(todo)

    from tqdm.auto import tqdm

    n_todo = sum(min(shard_size, len(prompts) - k * shard_size) for k in todo)
    bar = tqdm(total=n_todo, unit="prompt", desc=f"regenerate (rank {rank}/{world_size})", disable=not progress)
    new_tokens, seconds = 0, 0.0
    for k in todo:
        lo = k * shard_size
        shard = [list(p) for p in prompts[lo:lo + shard_size]]
        # length buckets, longest first: a memory problem shows at once, and a static cache sized by the
        # first (largest) batch is reused by the later ones instead of growing (and recompiling) each time
        order = sorted(range(len(shard)), key=lambda j: (-len(shard[j]), j))
        responses: list[list[int]] = [[] for _ in shard]
        shard_tokens, t0 = 0, time.perf_counter()
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            outs = generator.generate([shard[j] for j in idx], max_new_tokens, temperature=temperature,
                                      seed=_batch_seed(seed, k, b // batch_size))
            if len(outs) != len(idx):
                raise RuntimeError(f"generator returned {len(outs)} responses for {len(idx)} prompts")
            for j, r in zip(idx, outs):
                responses[j] = [int(t) for t in r]
                shard_tokens += len(r)
            bar.update(len(idx))
            elapsed = seconds + time.perf_counter() - t0
            bar.set_postfix(tok_s=f"{(new_tokens + shard_tokens) / max(elapsed, 1e-9):.0f}")
        dt = time.perf_counter() - t0
        new_tokens += shard_tokens
        seconds += dt
        # only this rank writes shard k; a killed run's leftover temp file is simply overwritten
        tmp = out_dir / f".shard-{k:05d}.json.tmp"
        with open(tmp, "w") as f:
            json.dump({"shard": k, "start": lo, "responses": responses, "new_tokens": shard_tokens,
                       "seconds": dt}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _shard_path(out_dir, k))
    bar.close()
    total_tokens, total_seconds = 0, 0.0
    for k in mine:
        d = json.loads(_shard_path(out_dir, k).read_text())
        total_tokens += d["new_tokens"]
        total_seconds += d["seconds"]
    return RegenStats(n_shards, len(todo), skipped, n_todo, new_tokens, seconds, total_tokens, total_seconds)


def missing_shards(out_dir: str | os.PathLike, n_prompts: int, shard_size: int) -> list[int]:
    n_shards = -(-n_prompts // shard_size)
    return [k for k in range(n_shards) if not _shard_path(Path(out_dir), k).exists()]


def load_responses(out_dir: str | os.PathLike, n_prompts: int, shard_size: int) -> tuple[list[list[int]], dict]:
    """All responses in prompt order, and the summed generation stats of every shard (all ranks)."""
    out_dir = Path(out_dir)
    missing = missing_shards(out_dir, n_prompts, shard_size)
    if missing:
        raise FileNotFoundError(f"{out_dir}: shards {missing[:10]}{'...' if len(missing) > 10 else ''} are not "
                                "finished; run the regeneration on every rank (or rerun to resume)")
    responses: list[list[int]] = []
    tokens, seconds = 0, 0.0
    for k in range(-(-n_prompts // shard_size)):
        d = json.loads(_shard_path(out_dir, k).read_text())
        assert d["start"] == len(responses), f"{_shard_path(out_dir, k)} starts at {d['start']}"
        responses.extend(d["responses"])
        tokens += d["new_tokens"]
        seconds += d["seconds"]
    return responses, {"new_tokens": tokens, "seconds": seconds,
                       "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}
