"""Prompt sources: read records, normalize them to conversations, dedup, mix, split.

Every record becomes a `Record`: a conversation (list of {role, content}; roles system/user/assistant)
whose last message is the dataset's own assistant response when it has one. Local files are read here
directly (JSONL and JSON with exact line / index numbers, Parquet and Arrow through pyarrow), so the stage
runs on machines without `datasets`; Hub ids and `save_to_disk` folders go through `datasets`, imported
only then.

Accounting: every record read ends in exactly one bucket: rejected, duplicate, not selected (mixture /
max_samples), holdout, or train. `SourceResult.counts` holds the buckets; `check_accounting` closes them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import DataConfig, SourceConfig

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
}
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".arrow", ".feather")


class BadRecordError(ValueError):
    """A malformed record. `reason` is a short category used for counts; str(err) says where and what."""

    def __init__(self, reason: str, detail: str, where: str | None = None):
        self.reason, self.detail, self.where = reason, detail, where
        super().__init__(self._text())

    def _text(self) -> str:
        head = f"{self.where}: " if self.where else ""
        return (f"{head}bad record ({self.reason}): {self.detail}. Fix or remove the record, or set "
                f"data.on_bad_record=skip to write it to rejected.jsonl and go on.")

    def at(self, where: str) -> "BadRecordError":
        return BadRecordError(self.reason, self.detail, where)


class NotEnoughPrompts(ValueError):
    """Too few usable prompts for the holdout and training (one line, with the counts)."""


@dataclass
class Record:
    uid: str                     # "<source index>:<row number>", stable across runs
    source: str                  # SourceConfig.path_or_id
    where: str                   # "file.jsonl line 12" / "file.json [3]" / "id (train) row 7"
    messages: list[dict[str, str]]

    @property
    def has_response(self) -> bool:
        return self.messages[-1]["role"] == "assistant"

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation without the dataset's final assistant response."""
        return self.messages[:-1] if self.has_response else self.messages

    @property
    def response(self) -> str | None:
        return self.messages[-1]["content"] if self.has_response else None

    def to_json(self) -> dict[str, Any]:
        return {"uid": self.uid, "source": self.source, "where": self.where, "messages": self.messages}


@dataclass
class Rejected:
    source: str
    where: str
    reason: str
    detail: str
    record: Any  # the raw record, or the raw line when it was not JSON

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "where": self.where, "reason": self.reason, "detail": self.detail,
                "record": self.record}


@dataclass
class SourceResult:
    train: list[Record]
    holdout: list[Record]
    rejected: list[Rejected]
    counts: dict[str, int]                            # read / rejected / duplicates / not_selected / holdout / train
    per_source: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- reading


def _is_hub_id(s: str) -> bool:
    return not os.path.exists(s) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", s) is not None and not s.endswith(
        LOCAL_SUFFIXES)


def iter_raw(src: SourceConfig) -> Iterator[tuple[str, Any]]:
    """Yield (where, raw record) for every record of a source; raw is a BadRecordError for unparseable rows."""
    p = src.path_or_id
    if os.path.isdir(p):
        yield from _iter_datasets(src, disk=True)
    elif _is_hub_id(p):
        yield from _iter_datasets(src, disk=False)
    elif not os.path.exists(p):
        raise FileNotFoundError(f"data source {p!r}: no such file, and it is not a Hub dataset id")
    elif p.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(p)
    elif p.endswith((".json", ".json.gz")):
        yield from _iter_json(p)
    elif p.endswith(".parquet"):
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(p).iter_batches():
            for row in batch.to_pylist():
                yield f"{p} row {n}", row
                n += 1
    elif p.endswith((".arrow", ".feather")):
        for n, row in enumerate(_read_arrow(p).to_pylist()):
            yield f"{p} row {n}", row
    else:
        raise ValueError(f"data source {p!r}: unknown file type; use one of {LOCAL_SUFFIXES}, a "
                         "`save_to_disk` folder or a Hub dataset id")


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRecordError("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})",
                                            where)


def _iter_json(path: str) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a JSONL file named .json
            yield from _iter_jsonl(path)
            return
        raise ValueError(f"{path} line {e.lineno} column {e.colno}: the file is not valid JSON ({e.msg}); "
                         "fix it, or give records one per line as .jsonl so bad lines can be skipped") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: expected a JSON list of records (or an object holding exactly one "
                             f"list), got an object with keys {sorted(data)[:10]}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path} [{i}]", row


def _read_arrow(path: str):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(path) as src:
        try:
            return ipc.open_file(src).read_all()
        except pa.ArrowInvalid:
            src.seek(0)
            return ipc.open_stream(src).read_all()  # `datasets` writes the streaming format


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{what} needs the `datasets` package (pip install datasets). Local .jsonl, .json, "
                          ".parquet and .arrow files do not need it.") from None
    return datasets


def _iter_datasets(src: SourceConfig, disk: bool) -> Iterator[tuple[str, Any]]:
    p = src.path_or_id
    datasets = _import_datasets(f"data source {p!r} ({'save_to_disk folder' if disk else 'Hub dataset'})")
    if disk:
        ds = datasets.load_from_disk(p)
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise KeyError(f"data source {p!r}: no split {src.split!r}; it has {list(ds)}")
            ds = ds[src.split]
    else:
        try:
            ds = datasets.load_dataset(p, src.subset, split=src.split)
        except Exception as e:  # noqa: BLE001 - re-raised with the source named
            raise RuntimeError(f"data source {p!r} (Hub id, subset={src.subset!r}, split={src.split!r}) could "
                               f"not be loaded: {e}. Check the id, subset and split, and that the Hub is "
                               "reachable, or download it and point path_or_id at the local file.") from e
    label = f"{p} ({src.split})"
    for i, row in enumerate(ds):
        yield f"{label} row {i}", row


# ------------------------------------------------------------------------------------------ normalizing


_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def parse_path(path: str) -> list[str | int]:
    """'turns[0].content' -> ['turns', 0, 'content']."""
    out: list[str | int] = []
    pos = 0
    for m in _PATH_TOKEN.finditer(path):
        gap = path[pos:m.start()]
        if gap not in ("", "."):
            raise ValueError(f"field path {path!r}: cannot parse near {gap!r}")
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not out or path[pos:]:
        raise ValueError(f"field path {path!r}: cannot parse; use names, dots and [index], e.g. turns[0].content")
    return out


def get_path(record: Any, path: str, required: bool = True) -> Any:
    cur = record
    for step, key in enumerate(parse_path(path)):
        seen = path if step == 0 else f"{path} (at step {key!r})"
        if isinstance(key, int):
            if not isinstance(cur, list):
                raise BadRecordError("wrong_type", f"field {seen}: expected a list, got {type(cur).__name__}")
            if not -len(cur) <= key < len(cur):
                if not required:
                    return None
                raise BadRecordError("missing_field", f"field {seen}: index {key} out of range ({len(cur)} items)")
            cur = cur[key]
        else:
            if not isinstance(cur, dict):
                raise BadRecordError("wrong_type", f"field {seen}: expected an object, got {type(cur).__name__}")
            if key not in cur or cur[key] is None:
                if not required:
                    return None
                if key in cur:  # present but JSON null: say so, not "missing" next to a list naming it
                    raise BadRecordError("null_field", f"field '{path}' is null; expected a value")
                raise BadRecordError("missing_field", f"missing field {key!r} (path {path!r}); the record has "
                                                      f"keys {sorted(cur)[:12]}")
            cur = cur[key]
    return cur


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecordError("wrong_type", f"{what} must be a string, got {type(value).__name__}")
    return value


def _not_an_object(record: Any, expected: str = "a JSON object") -> BadRecordError:
    """The error for a record that is not an object: a JSON null record is named as such."""
    if record is None:
        return BadRecordError("null_record", f"the record is null; expected {expected}")
    return BadRecordError("wrong_type", f"the record is a JSON {_JSON_TYPES.get(type(record), type(record).__name__)}; "
                                        f"expected {expected}")


_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", list: "list"}


def _expected_record(src: SourceConfig, fmt: str) -> str:
    """'a JSON object with the field ...' for the error text of a record that is not an object."""
    key = src.field or {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction"}.get(fmt)
    return f"a JSON object with the field {key!r}" if key else "a JSON object"


def detect_format(record: Any) -> str:
    """Format of a source from one record (format="auto")."""
    if not isinstance(record, dict):
        raise _not_an_object(record, "a JSON object (with messages, conversations or instruction)")
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if key in record:
            return fmt
    raise ValueError(f"cannot tell the format of a record with keys {sorted(record)[:12]}: set the source's "
                     "format ('messages', 'sharegpt', 'alpaca', or 'prompt' with field=...)")


def normalize(record: Any, src: SourceConfig, fmt: str) -> list[dict[str, str]]:
    """Turn one raw record into a conversation; raises BadRecordError (without `where`)."""
    if not isinstance(record, dict):
        raise _not_an_object(record, _expected_record(src, fmt))
    if fmt in ("messages", "sharegpt"):
        key = src.field or ("messages" if fmt == "messages" else "conversations")
        turns = get_path(record, key)
        if not isinstance(turns, list) or not turns:
            raise BadRecordError("wrong_type", f"field {key!r} must be a non-empty list of turns")
        msgs = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise BadRecordError("wrong_type", f"{key}[{i}] must be an object, got {type(t).__name__}")
            if fmt == "messages":
                role = get_path(t, "role")
                content = get_path(t, "content")
            else:
                raw_role = get_path(t, "from")
                role = SHAREGPT_ROLES.get(str(raw_role).lower())
                if role is None:
                    raise BadRecordError("bad_role", f"{key}[{i}].from = {raw_role!r}; known: {sorted(SHAREGPT_ROLES)}")
                content = get_path(t, "value")
            if role not in ROLES:
                raise BadRecordError("bad_role", f"{key}[{i}].role = {role!r}; supported roles are {ROLES}")
            msgs.append({"role": role, "content": _text(content, f"{key}[{i}] content")})
    elif fmt == "alpaca":
        instruction = _text(get_path(record, src.field or "instruction"), "instruction")
        extra = get_path(record, "input", required=False)
        extra = _text(extra, "input") if extra is not None else ""
        user = instruction.strip() + ("\n\n" + extra.strip() if extra.strip() else "")
        msgs = [{"role": "user", "content": user}]
        rkey = src.response_field or ("output" if "output" in record else "response")
        response = get_path(record, rkey, required=False)
        if response is not None:
            msgs.append({"role": "assistant", "content": _text(response, f"response field {rkey!r}")})
    elif fmt == "prompt":
        msgs = [{"role": "user", "content": _text(get_path(record, src.field), f"field {src.field!r}")}]
        if src.response_field:
            response = get_path(record, src.response_field, required=False)
            if response is not None:
                msgs.append({"role": "assistant", "content": _text(response, f"field {src.response_field!r}")})
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return _check_conversation(msgs)


def _check_conversation(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Roles: an optional system turn, then user and assistant alternating, starting with user."""
    roles = [m["role"] for m in msgs]
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(turns)):
        raise BadRecordError("bad_role", "roles must be an optional system turn, then user and assistant "
                                         f"alternating from user; got {roles}")
    prompt = msgs[:-1] if roles[-1] == "assistant" else msgs
    users = [m for m in prompt if m["role"] == "user"]
    if not any(m["content"].strip() for m in users):
        raise BadRecordError("empty_prompt", "the prompt is empty (no user text)")
    return msgs


def prompt_key(messages: list[dict[str, str]]) -> str:
    """Dedup key: hash of the prompt's turns, whitespace-collapsed and case-folded."""
    norm = [(m["role"], " ".join(unicodedata.normalize("NFKC", m["content"]).casefold().split()))
            for m in messages]
    return hashlib.sha1(json.dumps(norm, ensure_ascii=False).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ the source step


def read_source(index: int, src: SourceConfig, *, require_response: bool, on_bad_record: str,
                rejected: list[Rejected]) -> tuple[list[Record], int]:
    """Normalize every record of one source. Returns (records, number read); bad ones go to `rejected`."""
    fmt = None if src.format == "auto" else src.format
    records: list[Record] = []
    n_read = 0
    for n_read, (where, raw) in enumerate(iter_raw(src), 1):
        try:
            if isinstance(raw, BadRecordError):
                raise raw
            if fmt is None:
                fmt = detect_format(raw)
            msgs = normalize(raw, src, fmt)
            if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"].strip():
                if require_response:
                    raise BadRecordError("empty_response", "the final assistant response is empty and "
                                                           "data.regenerate is false")
                msgs = msgs[:-1]  # regeneration replaces it anyway
            if require_response and msgs[-1]["role"] != "assistant":
                raise BadRecordError("no_response", "the record has no response and data.regenerate is false"
                                     + ("" if fmt not in ("prompt", "alpaca") else
                                        "; set the source's response_field"))
        except BadRecordError as e:
            e = e.at(where)
            if on_bad_record == "raise":
                raise e from None
            rejected.append(Rejected(src.name, where, e.reason, e.detail,
                                     None if isinstance(raw, BadRecordError) else raw))
            continue
        records.append(Record(f"{index}:{n_read - 1}", src.name, where, msgs))
    return records, n_read


def _quotas(weights: list[float], total: int) -> list[int]:
    """Largest-remainder split of `total` in proportion to `weights`."""
    s = sum(weights)
    exact = [w * total / s for w in weights]
    q = [int(x) for x in exact]
    for i in sorted(range(len(q)), key=lambda i: (q[i] - exact[i], i))[: total - sum(q)]:
        q[i] += 1
    return q


class DataMixError(ValueError):
    """The sources cannot supply data.num_samples prompts."""


def mix_quotas(weights: list[float], available: list[int], total: int) -> list[int]:
    """Split `total` in proportion to `weights`, capped by what each source has: a source that runs out is
    used whole and the others fill the remainder, again in proportion to their weights ("water filling").
    Needs total <= sum(available)."""
    if total > sum(available):
        raise DataMixError(f"{total} prompts asked, only {sum(available)} available")
    quotas = [0] * len(weights)
    open_ = list(range(len(weights)))
    left = total
    while open_:
        share = _quotas([weights[i] for i in open_], left)
        full = [i for i, q in zip(open_, share) if q > available[i]]
        if not full:  # every remaining source can give its share
            for i, q in zip(open_, share):
                quotas[i] = q
            break
        for i in full:  # these run out: use them whole, re-split the rest
            quotas[i] = available[i]
            left -= available[i]
        open_ = [i for i in open_ if i not in full]
    return quotas


def load_sources(cfg: DataConfig, *, require_response: bool, rejected: list[Rejected] | None = None) -> SourceResult:
    """Read, normalize, dedup, mix and split all sources of `cfg` (deterministic for a given seed).

    rejected: a list the bad records are appended to as they are read (default: a new one), so that a caller
    still has them when a later step (mixture, holdout) raises."""
    if not cfg.sources:
        raise ValueError("data.sources is empty: give at least one {path_or_id, format, field}")
    rejected = [] if rejected is None else rejected
    seen: set[str] = set()
    pools: list[list[Record]] = []
    per_source: list[dict[str, Any]] = []
    for i, src in enumerate(cfg.sources):
        n_rej = len(rejected)
        records, n_read = read_source(i, src, require_response=require_response,
                                      on_bad_record=cfg.on_bad_record, rejected=rejected)
        unique = []
        for r in records:
            k = prompt_key(r.prompt_messages)
            if cfg.dedup and k in seen:
                continue
            seen.add(k)
            unique.append(r)
        if src.max_samples is not None and len(unique) > src.max_samples:
            keep = sorted(random.Random(f"{cfg.seed}/max_samples/{i}").sample(range(len(unique)), src.max_samples))
            unique_capped = [unique[j] for j in keep]
        else:
            unique_capped = unique
        pools.append(unique_capped)
        per_source.append({"source": src.name, "read": n_read, "rejected": len(rejected) - n_rej,
                           "duplicates": len(records) - len(unique), "available": len(unique_capped),
                           "weight": src.weight})

    if cfg.take_all:
        quotas = [len(p) for p in pools]
    else:
        try:
            quotas = mix_quotas([s.weight for s in cfg.sources], [len(p) for p in pools], cfg.num_samples)
        except DataMixError:
            have = ", ".join(f"{s['source']}: {s['available']}" for s in per_source)
            raise DataMixError(
                f"data.num_samples={cfg.num_samples} is more than the {sum(map(len, pools))} usable prompts of all "
                f"sources ({have}); lower data.num_samples, set data.num_samples=all to take every prompt, use "
                "data.samples_per_prompt for more responses per prompt, or add sources") from None

    selected: list[Record] = []
    for i, (q, pool, info) in enumerate(zip(quotas, pools, per_source)):
        pick = sorted(random.Random(f"{cfg.seed}/mixture/{i}").sample(range(len(pool)), q))
        selected.extend(pool[j] for j in pick)
        info["selected"] = q
        info["share"] = round(q / max(1, sum(quotas)), 4)  # the real mix (weights are only proportions)
        info["not_selected"] = info["read"] - info["rejected"] - info["duplicates"] - q
    random.Random(f"{cfg.seed}/order").shuffle(selected)

    n_hold = cfg.holdout_count if cfg.holdout_count is not None else round(cfg.holdout_fraction * len(selected))
    if n_hold and n_hold >= len(selected):  # a holdout that takes every prompt leaves nothing to train on
        raise NotEnoughPrompts(_too_few(cfg, n_hold, len(selected), per_source))
    holdout, train = selected[:n_hold], selected[n_hold:]
    counts = {
        "read": sum(s["read"] for s in per_source),
        "rejected": len(rejected),
        "duplicates": sum(s["duplicates"] for s in per_source),
        "not_selected": sum(s["not_selected"] for s in per_source),
        "holdout": len(holdout),
        "train": len(train),
    }
    return SourceResult(train, holdout, rejected, counts, per_source)


def _too_few(cfg: DataConfig, n_hold: int, n_selected: int, per_source: list[dict[str, Any]]) -> str:
    key = (f"data.holdout_count={n_hold}" if cfg.holdout_count is not None
           else f"data.holdout_fraction={cfg.holdout_fraction} ({n_hold} prompts)")
    read = sum(s["read"] for s in per_source)
    rej = sum(s["rejected"] for s in per_source)
    dup = sum(s["duplicates"] for s in per_source)
    where = f"{n_selected} prompts were selected ({read} records read, {rej} rejected, {dup} duplicates)"
    if n_selected == 0:
        return f"no usable prompts: {where}; fix the sources (the rejected records and their reasons are in rejected.jsonl)"
    return (f"{key} leaves no prompt to train on: {where}; set data.holdout_count to at most {n_selected - 1} "
            "(data.holdout_count=0 for none), or give more prompts")


def reason_counts(rejected: list[Rejected]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejected:
        out[r.reason] = out.get(r.reason, 0) + 1
    return dict(sorted(out.items()))


def write_jsonl(path: Path, rows) -> None:
    """Write rows (objects with to_json() or dicts) atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_json() if hasattr(r, "to_json") else r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
