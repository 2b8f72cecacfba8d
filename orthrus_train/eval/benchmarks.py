"""Evaluation benchmarks: where each one's prompts come from, which field holds them, how they are rendered.

A benchmark is read from a local file when one is configured (`benchmark_paths[name]`, or the file's usual
place under `data_root`, laid out like the project's shared/data), else from the Hugging Face Hub (needs
`datasets` and a network). Benchmarks with neither fail with an error naming what to set.

Prompt field: a path into the record (`question`, `turns[0].content`, `turns`). A string is one user turn; a
list of strings (or of {content} / {role, content} objects: user turns only) is a multi-turn conversation,
asked turn by turn, each turn after the model's own answer to the previous one (MT-Bench protocol).

Held-out check: every prompt carries `key` = `data.sources.prompt_key` of its first user turn, the same hash
the data stage dedups training prompts with; prompts whose key is among the training prompts are reported,
and dropped when asked.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..data.sources import BadRecordError, get_path, iter_raw, prompt_key
from ..data.config import SourceConfig


class BenchmarkUnavailable(RuntimeError):
    """A benchmark's prompts cannot be found (no local file, no Hub access)."""


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    field: str  # prompt field path; see the module docstring
    shared_file: str | None = None  # path under data_root (shared/data layout)
    hub: tuple[str, str | None, str] | None = None  # (dataset id, config, split)
    alt_fields: tuple[str, ...] = ()  # tried in order when `field` is missing (other published layouts)
    note: str = ""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "gsm8k": BenchmarkSpec("gsm8k", "question", "gsm8k/test.jsonl", ("openai/gsm8k", "main", "test"),
                           note="GSM8K test (grade-school math), field `question`"),
    "math500": BenchmarkSpec("math500", "problem", None, ("HuggingFaceH4/MATH-500", None, "test"),
                             note="MATH-500 (HuggingFaceH4/MATH-500 test split), field `problem`"),
    "humaneval": BenchmarkSpec("humaneval", "prompt", "humaneval/HumanEval.jsonl.gz",
                               ("openai/openai_humaneval", None, "test"),
                               note="HumanEval, field `prompt` (signature + docstring)"),
    "mt_bench": BenchmarkSpec("mt_bench", "turns", None, ("HuggingFaceH4/mt_bench_prompts", None, "train"),
                              alt_fields=("prompt",),
                              note="MT-Bench 80 questions, both turns (FastChat question.jsonl `turns`, or "
                                   "HuggingFaceH4/mt_bench_prompts `prompt`)"),
    "alpaca": BenchmarkSpec("alpaca", "instruction", "alpaca_eval/model_outputs.json",
                            ("tatsu-lab/alpaca_eval", "alpaca_eval", "eval"),
                            note="AlpacaEval 805 instructions, field `instruction`"),
    "arena_hard": BenchmarkSpec("arena_hard", "turns[0].content", "arena_hard/question.jsonl",
                                ("lmarena-ai/arena-hard-auto-v0.1", None, "train"),
                                note="Arena-Hard v0.1, field `turns[0].content`"),
    "spec_bench": BenchmarkSpec("spec_bench", "turns", None, None,
                                note="Spec-Bench data/spec_bench/question.jsonl (github.com/hemingkx/Spec-Bench), "
                                     "all turns"),
    "holdout": BenchmarkSpec("holdout", "messages", None, None,
                             note="the data stage's held-out prompts, RUN/data/holdout.jsonl (user turns of "
                                  "`messages`)"),
}


@dataclass
class EvalPrompt:
    benchmark: str
    index: int  # record number in the source (0-based)
    turns: list[str]  # user turns, asked in order
    key: str  # prompt_key of the first user turn
    where: str

    @property
    def uid(self) -> str:
        return f"{self.benchmark}:{self.index}"


@dataclass
class BenchmarkPrompts:
    name: str
    source: str  # file path or "hub:<id>"
    field: str
    prompts: list[EvalPrompt]
    available: int  # records in the source
    train_overlap: list[str] = field(default_factory=list)  # uids of prompts also among training prompts
    excluded: int = 0  # prompts dropped for overlap

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "field": self.field, "available": self.available,
                "used": len(self.prompts), "train_overlap": len(self.train_overlap),
                "train_overlap_uids": self.train_overlap[:50], "excluded": self.excluded}


def first_turn_key(text: str) -> str:
    return prompt_key([{"role": "user", "content": text}])


def _turns(value: Any, path: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return [value["content"]]
    if isinstance(value, list) and value:
        out = []
        for t in value:
            if isinstance(t, str):
                out.append(t)
            elif isinstance(t, dict) and "content" in t:
                if t.get("role", "user") == "user":
                    out.append(t["content"])
            else:
                raise BadRecordError("wrong_type", f"field {path!r}: list items must be strings or {{content}} "
                                                   f"objects, got {type(t).__name__}")
        if out and all(isinstance(t, str) for t in out):
            return out
    raise BadRecordError("wrong_type", f"field {path!r} must be a string or a non-empty list of turns, "
                                       f"got {type(value).__name__}")


def _extract(record: Any, fields: Sequence[str]) -> tuple[list[str], str]:
    err = None
    for f in fields:
        try:
            return _turns(get_path(record, f), f), f
        except BadRecordError as e:
            err = err or e
    raise err


def resolve_source(name: str, benchmark_paths: dict[str, str], data_root: str | None,
                   default_paths: dict[str, str] | None = None) -> tuple[str, str]:
    """("file", path) or ("hub", id); raises BenchmarkUnavailable naming what to set.
    default_paths: files used when benchmark_paths has no entry (run_eval: holdout -> RUN/data/holdout.jsonl)."""
    spec = BENCHMARKS.get(name)
    if name in benchmark_paths:
        p = os.path.expanduser(benchmark_paths[name])
        if not os.path.exists(p):
            raise BenchmarkUnavailable(f"benchmark {name!r}: eval.benchmark_paths.{name} = {p!r} does not exist")
        return "file", p
    if default_paths and name in default_paths and os.path.exists(default_paths[name]):
        return "file", default_paths[name]
    if spec is None:
        raise BenchmarkUnavailable(
            f"unknown benchmark {name!r}: known ones are {sorted(BENCHMARKS)}; for your own prompts set "
            f"eval.benchmark_paths.{name} to a JSONL/JSON file and eval.benchmark_fields.{name} to its prompt field")
    if data_root and spec.shared_file:
        p = os.path.join(os.path.expanduser(data_root), spec.shared_file)
        if os.path.exists(p):
            return "file", p
    hint = (f"set eval.benchmark_paths.{name} to a local copy ({spec.note})")
    if spec.hub is None:
        raise BenchmarkUnavailable(f"benchmark {name!r} has no local file and no Hub source: {hint}")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise BenchmarkUnavailable(f"benchmark {name!r}: no local file, and Hub access is off (HF_HUB_OFFLINE / "
                                   f"HF_DATASETS_OFFLINE): {hint}, or allow Hub access")
    return "hub", spec.hub[0]


def _iter_hub(name: str, hub: tuple[str, str | None, str]) -> Iterable[tuple[str, Any]]:
    spec = BENCHMARKS[name]
    hint = f"set eval.benchmark_paths.{name} to a local copy ({spec.note}), or make the Hub reachable"
    try:
        import datasets
    except ImportError:
        raise BenchmarkUnavailable(f"benchmark {name!r}: no local file and `datasets` is not installed: "
                                   f"{hint}") from None
    try:
        ds = datasets.load_dataset(hub[0], hub[1], split=hub[2])
    except Exception as e:  # network, auth, script-based dataset...
        raise BenchmarkUnavailable(f"benchmark {name!r}: loading {hub[0]} from the Hub failed "
                                   f"({e.__class__.__name__}: {str(e)[:300]}): {hint}") from None
    for i, row in enumerate(ds):
        yield f"hub:{hub[0]} row {i}", row


def load_benchmark(name: str, num_prompts: int | None = None, benchmark_paths: dict[str, str] | None = None,
                   benchmark_fields: dict[str, str] | None = None, data_root: str | None = None,
                   train_hashes: set[str] | None = None, exclude_train_overlap: bool = True,
                   default_paths: dict[str, str] | None = None) -> BenchmarkPrompts:
    """The first `num_prompts` prompts (file order) of a benchmark, after overlap exclusion."""
    benchmark_paths = benchmark_paths or {}
    benchmark_fields = benchmark_fields or {}
    spec = BENCHMARKS.get(name)
    if name in benchmark_fields:
        fields: tuple[str, ...] = (benchmark_fields[name],)
    elif spec is not None:
        fields = (spec.field,) + spec.alt_fields
    else:
        if name in benchmark_paths:
            raise BenchmarkUnavailable(f"benchmark {name!r}: set eval.benchmark_fields.{name} to the prompt field "
                                       "of its records (e.g. 'question' or 'turns[0].content')")
        fields = ()
    kind, src = resolve_source(name, benchmark_paths, data_root, default_paths)
    rows = iter_raw(SourceConfig(path_or_id=src)) if kind == "file" else _iter_hub(name, spec.hub)
    prompts, overlap, excluded, available = [], [], 0, 0
    for i, (where, raw) in enumerate(rows):
        if num_prompts is not None and len(prompts) >= num_prompts:
            available += 1  # only counted: records past the ones used are not checked
            continue
        if isinstance(raw, BadRecordError):
            raise ValueError(f"benchmark {name!r}: {raw}") from None
        try:
            turns, _ = _extract(raw, fields)
        except BadRecordError as e:
            raise ValueError(f"benchmark {name!r}, {where}: {e.detail}; set eval.benchmark_fields.{name} to the "
                             "field holding the prompt") from None
        available += 1
        p = EvalPrompt(name, i, turns, first_turn_key(turns[0]), where)
        if train_hashes and p.key in train_hashes:
            overlap.append(p.uid)
            if exclude_train_overlap:
                excluded += 1
                continue
        prompts.append(p)
    if not prompts:
        raise BenchmarkUnavailable(f"benchmark {name!r} ({src}): no usable prompts"
                                   + (f" ({excluded} excluded as training prompts)" if excluded else ""))
    source = src if kind == "file" else f"hub:{src}"
    return BenchmarkPrompts(name, source, fields[0], prompts, available, overlap, excluded)


def load_train_prompt_hashes(path: str) -> set[str]:
    """Training prompt hashes from a text file (one `prompt_key` per line) or a JSONL/JSON file of records
    holding `prompt_key`, or `messages` (the data stage's record layout: the prompt is every message before the
    final assistant turn; its first user turn is hashed, as for eval prompts)."""
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise FileNotFoundError(f"eval.train_prompts_file = {str(p)!r} does not exist")
    if p.suffix == ".txt":
        return {ln.strip() for ln in p.read_text().splitlines() if ln.strip()}
    out = set()
    for where, rec in iter_raw(SourceConfig(path_or_id=str(p))):
        if isinstance(rec, BadRecordError):
            raise rec
        if isinstance(rec, dict) and "messages" in rec:
            users = [m["content"] for m in rec["messages"] if m.get("role") == "user"]
            if users:
                out.add(first_turn_key(users[0]))
        elif isinstance(rec, dict) and "prompt_key" in rec:
            out.add(str(rec["prompt_key"]))
        else:
            raise ValueError(f"{where}: expected a record with `messages` or `prompt_key`, got "
                             f"{sorted(rec)[:10] if isinstance(rec, dict) else type(rec).__name__}")
    return out


class PromptRenderer:
    """Turns a conversation (user turns, with the model's own answers in between) into prompt token ids,
    through the tokenizer's chat template (`data.templates.ChatRenderer`, as training does) or as raw text."""

    def __init__(self, tokenizer, apply_chat_template: bool = True, enable_thinking: bool | None = None,
                 system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.chat = None
        if apply_chat_template:
            from ..data.templates import ChatRenderer, TemplateError

            try:
                self.chat = ChatRenderer(tokenizer, enable_thinking=enable_thinking, system_prompt=system_prompt)
            except TemplateError as e:
                raise ValueError(f"{e} (or set eval.apply_chat_template=false to feed raw prompt text)") from None
        self.system_prompt = system_prompt

    @staticmethod
    def messages(turns: Sequence[str], answers: Sequence[str]) -> list[dict[str, str]]:
        """Conversation up to user turn len(answers): [u0, a0, u1, a1, ..., u_n]."""
        msgs = []
        for i, a in enumerate(answers):
            msgs += [{"role": "user", "content": turns[i]}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": turns[len(answers)]})
        return msgs

    def encode(self, turns: Sequence[str], answers: Sequence[str] = ()) -> list[int]:
        msgs = self.messages(turns, answers)
        if self.chat is not None:
            return self.chat.tokens(self.chat.with_system(msgs), add_generation_prompt=True)
        parts = ([self.system_prompt] if self.system_prompt else []) + [m["content"] for m in msgs]
        ids = self.tokenizer("\n\n".join(parts), add_special_tokens=True)["input_ids"]
        return list(ids)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


def stop_token_ids(tokenizer, model=None, extra: Sequence[str] = ()) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos, the generation config's eos ids, and `extra` token strings."""
    ids = set()
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(getattr(model, "backbone", model), "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    if e is not None:
        ids.update(int(x) for x in (e if isinstance(e, (list, tuple)) else [e]))
    for t in extra:
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"eval.stop_tokens: {t!r} is not a single token of this tokenizer")
        ids.add(int(tid))
    return sorted(ids)


def describe() -> str:
    return json.dumps({k: v.note for k, v in BENCHMARKS.items()}, indent=1)
