"""Prompts the backbone writes itself (`data.self_prompts`): more prompts than the sources hold.

Drafting heads learn the target's own continuations, so what they need most is many different contexts, and a
few thousand prompts run out fast (more samples of the same prompts give the same contexts again). Here the
backbone also writes the prompts, as in Magpie (Xu et al., 2024, arXiv 2406.08464): the chat template is
rendered up to where a user's message begins (the "pre-query template", e.g. ``<|im_start|>user\\n`` for
ChatML), and the backbone, sampling, continues it up to its end-of-turn token. What it wrote is a user prompt
from its own idea of what users ask; the data stage then answers it like any other prompt.

With ``seed_words`` N > 0, each written prompt starts with the first N words of a training prompt of the
sources (chosen at random, seeded), so the written prompts keep the mix's domains (math, code, chat) and its
proportions; with 0 they start from the bare template.

Every written prompt ends in exactly one bucket (the data report's ``regeneration.self_prompts``):
``unfinished`` (cut by ``max_tokens`` before its end-of-turn token), ``too_short`` (fewer than ``min_words``
words), ``duplicates`` (the same prompt, whitespace-collapsed and case-folded, as a source prompt or an earlier
written one) or ``added`` to the training prompts. They are never held out: the validation rows stay the
sources' own prompts.

The writing is a regeneration like the responses' (`regen.regenerate`: sharded over ranks, resumable, seeded
by (data.seed, shard, row)), into ``RUN/data/self_prompts/``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .sources import Record, Rejected, prompt_key
from .templates import ChatRenderer

SOURCE_NAME = "self-written"
_SENTINEL = "\u2063ORTHRUS_USER_TEXT\u2063"


def pre_query_text(renderer: ChatRenderer) -> str:
    """The template's text before a lone user message's content (with data.chat_template.system_prompt, and the
    template's own default system turn where it writes one)."""
    text = renderer.render(renderer.with_system([{"role": "user", "content": _SENTINEL}]), add_generation_prompt=False)
    at = text.find(_SENTINEL)
    if at < 0:
        raise ValueError("data.self_prompts: the chat template does not render the user's message verbatim, so "
                         "the text before it cannot be found; use a template that does, or data.self_prompts.count=0")
    return text[:at]


def seed_texts(pool: Sequence[Record], n: int, words: int, seed: int) -> list[str]:
    """n openings: the first `words` words of the first user turn of a randomly chosen record of `pool`
    (seeded; '' each when words is 0 or the pool is empty)."""
    if words <= 0 or not pool:
        return [""] * n
    rng = random.Random(f"{seed}/self_prompts/seeds")
    out = []
    for _ in range(n):
        rec = pool[rng.randrange(len(pool))]
        user = next(m["content"] for m in rec.prompt_messages if m["role"] == "user")
        out.append(" ".join(user.split()[:words]))
    return out


@dataclass
class Written:
    """The result of `write_prompts`: the added records, the filtered ones, and the report section (its
    "count", "duplicates" and the other buckets)."""

    records: list[Record]
    rejected: list[Rejected]
    report: dict[str, Any]


def write_prompts(cfg: Any, renderer: ChatRenderer, generator: Any, out_dir: Path, pool: Sequence[Record],
                  seen_keys: set[str], *, eos_ids: Callable[[], set[int]], rank: int, world_size: int,
                  wait: Callable[[Path, int, int], None]) -> Written:
    """Have the backbone write `cfg.self_prompts.count` prompts (resumable shards in out_dir) and filter them.

    pool: the records whose openings seed the prompts (the training prompts of the sources).
    seen_keys: prompt keys already taken (sources' prompts); the added prompts' keys are added to it.
    eos_ids: the end-of-sequence ids once the generator exists (a prompt shorter than max_tokens ended there).
    wait(out_dir, n_prompts, shard_size): returns when every rank's shards are written.
    """
    from .regen import load_responses, regenerate

    sp = cfg.self_prompts
    tok = renderer.tokenizer
    head = pre_query_text(renderer)
    openings = seed_texts(pool, sp.count, sp.seed_words, cfg.seed)
    # prefix + opening tokenized together, as the template's text would be
    prompts = [list(tok(head + o, add_special_tokens=False)["input_ids"]) for o in openings]
    t0 = time.perf_counter()
    stats = regenerate(prompts, generator, out_dir, max_new_tokens=sp.max_tokens, temperature=sp.temperature,
                       seed=cfg.seed, batch_size=cfg.batch_size, shard_size=cfg.shard_size, rank=rank,
                       world_size=world_size, progress=cfg.progress)
    if world_size > 1:  # every rank needs every written prompt: the responses' shards split them all
        wait(out_dir, len(prompts), cfg.shard_size)
    outs, totals = load_responses(out_dir, len(prompts), cfg.shard_size)
    eos = eos_ids()
    records, rejected, dups, buckets = [], [], 0, {"unfinished": 0, "too_short": 0}
    for i, (opening, out) in enumerate(zip(openings, outs)):
        where = f"{out_dir.name} prompt {i}"
        ended = bool(out) and out[-1] in eos
        text = (opening + tok.decode(out, skip_special_tokens=True)).strip()
        reason = None
        if not ended and len(out) >= sp.max_tokens:
            reason, detail = "unfinished", f"no end-of-turn token within data.self_prompts.max_tokens={sp.max_tokens}"
        elif len(text.split()) < sp.min_words:
            reason, detail = "too_short", f"fewer than data.self_prompts.min_words={sp.min_words} words"
        if reason:
            buckets[reason] += 1
            rejected.append(Rejected(SOURCE_NAME, where, f"self_prompt_{reason}", detail, {"text": text}))
            continue
        msgs = [{"role": "user", "content": text}]
        key = prompt_key(msgs)
        if cfg.dedup and key in seen_keys:
            dups += 1
            continue
        seen_keys.add(key)
        records.append(Record(f"self:{i}", SOURCE_NAME, where, msgs))
    report = {"count": sp.count, "seed_words": sp.seed_words, "temperature": sp.temperature,
              "max_tokens": sp.max_tokens, "new_tokens": totals["new_tokens"], "seconds": round(totals["seconds"], 3),
              "tokens_per_s": round(totals["tokens_per_s"], 1), "shards": stats.shards,
              "shards_skipped": stats.shards_skipped, "wall_seconds_this_run": round(time.perf_counter() - t0, 3),
              **buckets, "duplicates": dups, "added": len(records)}
    assert sp.count == buckets["unfinished"] + buckets["too_short"] + dups + len(records)
    return Written(records, rejected, report)


def add_to_sources(src: Any, written: Written) -> None:
    """Append the written prompts to the training prompts of a SourceResult, with their own per-source entry
    and the counts that keep the stage's accounting closed (read = rejected + duplicates + ... + train)."""
    n, dups = written.report["count"], written.report["duplicates"]
    src.train.extend(written.records)
    src.rejected.extend(written.rejected)
    c = src.counts
    c["read"] += n
    c["rejected"] += len(written.rejected)
    c["duplicates"] += dups
    c["train"] += len(written.records)
    src.per_source.append({"source": SOURCE_NAME, "read": n, "rejected": len(written.rejected),
                           "duplicates": dups, "available": len(written.records), "weight": None,
                           "selected": len(written.records), "not_selected": 0})
    total = sum(s["selected"] for s in src.per_source)
    for s in src.per_source:
        s["share"] = round(s["selected"] / max(1, total), 4)
