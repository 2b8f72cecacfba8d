"""Pack tokenized conversations into fixed-length rows, write them as Arrow files, stream them back.

A document (one conversation: input_ids + loss_mask) is never split across rows: documents are placed
first-fit into a bounded window of open rows, in order, and each row is padded to `seq_len`. A row
records its documents' lengths (`doc_lengths`) and indices (`doc_ids`), from which the reader derives
`segment_ids` (1..k per document, 0 on padding) and `position_ids` (restarting at 0 per document), so
training can keep attention inside a document. Documents longer than `seq_len` are truncated or dropped
(`overlong`); a truncated document left with no supervised token is dropped too. Both are counted.

On disk: `<dir>/index.json` (format, seq_len, pad id, files, counts) and `<dir>/part-NNNNN.arrow` (Arrow
IPC file format, one record batch each). `PackedDataset` memory-maps them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

FORMAT = "orthrus-packed-v1"


@dataclass
class PackedRow:
    input_ids: list[int]
    loss_mask: list[int]
    doc_lengths: list[int]
    doc_ids: list[int]


@dataclass
class PackStats:
    documents: int = 0          # documents given to the packer
    packed: int = 0             # documents written (whole or truncated)
    truncated: int = 0          # written, cut to seq_len
    dropped_overlong: int = 0   # longer than seq_len and dropped (overlong=drop, or nothing supervised left)
    rows: int = 0
    tokens: int = 0             # non-padding tokens written
    supervised_tokens: int = 0  # tokens with loss_mask 1
    pad_tokens: int = 0
    dropped_doc_ids: list[int] = field(default_factory=list)


def fit_document(ids: Sequence[int], mask: Sequence[int], seq_len: int, overlong: str):
    """(ids, mask, truncated) for a document, or None when it is dropped."""
    if len(ids) != len(mask):
        raise ValueError(f"document has {len(ids)} tokens but {len(mask)} mask entries")
    if len(ids) <= seq_len:
        return list(ids), list(mask), False
    if overlong == "drop":
        return None
    if overlong != "truncate":
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    ids, mask = list(ids[:seq_len]), list(mask[:seq_len])
    return (ids, mask, True) if any(mask) else None


def pack(docs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_token_id: int,
         overlong: str = "truncate", open_rows: int = 64) -> tuple[list[PackedRow], PackStats]:
    """Pack documents (ids, mask) into rows of exactly seq_len tokens. doc_ids are positions in `docs`."""
    stats = PackStats(documents=len(docs))
    rows: list[PackedRow] = []
    bins: list[tuple[int, list[int]]] = []  # (used tokens, doc indices), oldest first
    fitted: dict[int, tuple[list[int], list[int]]] = {}

    def close(b: tuple[int, list[int]]) -> None:
        ids, mask, lengths = [], [], []
        for d in b[1]:
            ids += fitted[d][0]
            mask += fitted[d][1]
            lengths.append(len(fitted[d][0]))
            del fitted[d]
        pad = seq_len - len(ids)
        rows.append(PackedRow(ids + [pad_token_id] * pad, mask + [0] * pad, lengths, list(b[1])))
        stats.pad_tokens += pad

    for d, (ids, mask) in enumerate(docs):
        got = fit_document(ids, mask, seq_len, overlong)
        if got is None:
            stats.dropped_overlong += 1
            stats.dropped_doc_ids.append(d)
            continue
        ids, mask, cut = got
        stats.packed += 1
        stats.truncated += cut
        stats.tokens += len(ids)
        stats.supervised_tokens += sum(mask)
        fitted[d] = (ids, mask)
        for j, (used, members) in enumerate(bins):
            if used + len(ids) <= seq_len:
                bins[j] = (used + len(ids), members + [d])
                break
        else:
            bins.append((len(ids), [d]))
            if len(bins) > open_rows:
                close(bins.pop(0))
    for b in bins:
        close(b)
    stats.rows = len(rows)
    return rows, stats


# ------------------------------------------------------------------------------------------------ writing


def _schema(seq_len: int):
    import pyarrow as pa

    return pa.schema([
        ("input_ids", pa.list_(pa.int32(), seq_len)),
        ("loss_mask", pa.list_(pa.uint8(), seq_len)),
        ("doc_lengths", pa.list_(pa.int32())),
        ("doc_ids", pa.list_(pa.int64())),
    ])


def write_packed(rows: Sequence[PackedRow], out_dir: str | os.PathLike, *, seq_len: int, pad_token_id: int,
                 rows_per_file: int = 4096, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write rows to out_dir atomically (a sibling temp folder renamed at the end). Returns the index."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    schema = _schema(seq_len)
    files = []
    for f, lo in enumerate(range(0, len(rows), rows_per_file)):
        part = rows[lo:lo + rows_per_file]
        batch = pa.record_batch([
            pa.array([r.input_ids for r in part], type=schema.field("input_ids").type),
            pa.array([r.loss_mask for r in part], type=schema.field("loss_mask").type),
            pa.array([r.doc_lengths for r in part], type=schema.field("doc_lengths").type),
            pa.array([r.doc_ids for r in part], type=schema.field("doc_ids").type),
        ], schema=schema)
        name = f"part-{f:05d}.arrow"
        with pa.OSFile(str(tmp / name), "wb") as sink, ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)
        files.append({"name": name, "rows": len(part)})
    index = {"format": FORMAT, "seq_len": seq_len, "pad_token_id": pad_token_id, "rows": len(rows),
             "files": files, "tokens": sum(sum(r.doc_lengths) for r in rows),
             "supervised_tokens": sum(sum(r.loss_mask) for r in rows), **(extra or {})}
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return index


# ------------------------------------------------------------------------------------------------ reading


def segments(doc_lengths: Sequence[int], seq_len: int):
    """(segment_ids, position_ids) as numpy arrays for a row with these document lengths."""
    import numpy as np

    seg = np.zeros(seq_len, dtype=np.int32)
    pos = np.zeros(seq_len, dtype=np.int64)
    start = 0
    for k, n in enumerate(doc_lengths, 1):
        seg[start:start + n] = k
        pos[start:start + n] = np.arange(n)
        start += n
    return seg, pos


class PackedDataset:
    """Packed rows in a fixed order, as dicts of torch tensors, with an exact resume position.

    Each item: input_ids (L,) long, loss_mask (L,) bool, segment_ids (L,) int32 (0 = padding),
    position_ids (L,) long, doc_ids (k,) long. With world_size > 1, rank r reads global rows r, r+w, ...
    and every rank gets len(total) // world_size rows (the last incomplete round is left out).

    Iterating yields from the current position; `state_dict()` counts the rows yielded in this epoch, so
    `load_state_dict` on a fresh reader continues with the next row. Use it in the training process
    (a DataLoader with workers prefetches rows and would make the count run ahead).
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0, world_size: int = 1):
        import pyarrow as pa
        import pyarrow.ipc as ipc

        path = Path(path)
        if not (path / "index.json").exists() and (path / "train" / "index.json").exists():
            path = path / "train"  # a run's data folder
        index_file = path / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{index_file} not found: {path} is not a packed dataset (run the data stage)")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_file}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.path, self.rank, self.world_size = path, rank, world_size
        self.seq_len = int(self.index["seq_len"])
        self._tables = []
        self._starts = []
        n = 0
        for f in self.index["files"]:
            table = ipc.open_file(pa.memory_map(str(path / f["name"]))).read_all()
            if table.num_rows != f["rows"]:
                raise ValueError(f"{path / f['name']}: {table.num_rows} rows, index.json says {f['rows']}")
            ids = table.column("input_ids").combine_chunks()
            mask = table.column("loss_mask").combine_chunks()
            self._tables.append((ids.values.to_numpy().reshape(-1, self.seq_len),
                                 mask.values.to_numpy().reshape(-1, self.seq_len),
                                 table.column("doc_lengths").to_pylist(), table.column("doc_ids").to_pylist()))
            self._starts.append(n)
            n += table.num_rows
        self.total_rows = n
        self.position = 0
        self.epoch = 0

    def __len__(self) -> int:
        return self.total_rows // self.world_size

    def __getitem__(self, i: int) -> dict[str, Any]:
        import bisect

        import torch

        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        g = self.rank + i * self.world_size
        f = bisect.bisect_right(self._starts, g) - 1
        ids, mask, lengths, doc_ids = self._tables[f]
        r = g - self._starts[f]
        seg, pos = segments(lengths[r], self.seq_len)
        return {
            "input_ids": torch.tensor(ids[r], dtype=torch.long),
            "loss_mask": torch.tensor(mask[r], dtype=torch.bool),
            "segment_ids": torch.from_numpy(seg),
            "position_ids": torch.from_numpy(pos),
            "doc_ids": torch.tensor(doc_ids[r], dtype=torch.long),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position >= len(self):
            self.position = 0
            self.epoch += 1
        while self.position < len(self):
            row = self[self.position]
            self.position += 1
            yield row

    def state_dict(self) -> dict[str, Any]:
        return {"rows_consumed": self.position, "epoch": self.epoch, "rank": self.rank,
                "world_size": self.world_size, "total_rows": self.total_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("world_size", "total_rows"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"resume state has {key}={state[key]} but this reader has {getattr(self, key)}; "
                                 "resume with the same packed data and the same number of ranks")
        if not 0 <= state["rows_consumed"] <= len(self):
            raise ValueError(f"rows_consumed={state['rows_consumed']} is outside [0, {len(self)}]")
        self.position = int(state["rows_consumed"])
        self.epoch = int(state.get("epoch", 0))


def stats_dict(stats: PackStats) -> dict[str, Any]:
    d = asdict(stats)
    d.pop("dropped_doc_ids")
    return d
