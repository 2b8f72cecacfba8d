"""Packing: nothing lost, nothing reordered inside a document, masks aligned; the reader resumes exactly."""

import random

import pytest
import torch

from orthrus_train.data import PackedDataset, pack, write_packed

PAD = 0


def make_docs(n, seed=0, lo=3, hi=40):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randint(1, 999) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        docs.append((ids, [0] * prompt + [1] * (length - prompt)))
    return docs


def unpack(row):
    """The documents of a packed row, cut by its doc_lengths."""
    out, pos = [], 0
    for n in row.doc_lengths:
        out.append((row.input_ids[pos:pos + n], row.loss_mask[pos:pos + n]))
        pos += n
    return out, pos


def test_packing_preserves_every_document():
    docs = make_docs(300)
    rows, stats = pack(docs, seq_len=64, pad_token_id=PAD)
    seen = {}
    for row in rows:
        assert len(row.input_ids) == len(row.loss_mask) == 64
        parts, used = unpack(row)
        assert row.input_ids[used:] == [PAD] * (64 - used) and not any(row.loss_mask[used:])
        assert row.doc_ids == sorted(row.doc_ids)  # documents keep their order inside a row
        for d, part in zip(row.doc_ids, parts):
            assert d not in seen
            seen[d] = part
    assert sorted(seen) == list(range(len(docs)))
    # concatenating the unpacked documents in document order gives back the input, ids and mask aligned
    flat = [t for d in sorted(seen) for t in seen[d][0]], [m for d in sorted(seen) for m in seen[d][1]]
    assert flat == ([t for ids, _ in docs for t in ids], [m for _, mask in docs for m in mask])
    total = sum(len(ids) for ids, _ in docs)
    assert stats.tokens == total and stats.pad_tokens == 64 * len(rows) - total
    assert stats.supervised_tokens == sum(sum(m) for _, m in docs)
    assert stats.rows == len(rows) and stats.packed == 300 and stats.truncated == stats.dropped_overlong == 0
    assert len(rows) <= 1.1 * total / 64 + 1  # first-fit leaves little padding
    assert pack(docs, seq_len=64, pad_token_id=PAD)[0] == rows  # deterministic


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_documents(overlong):
    short = ([1, 2, 3], [0, 1, 1])
    long_ok = (list(range(1, 21)), [0] * 5 + [1] * 15)    # truncation keeps supervised tokens
    long_prompt = (list(range(1, 21)), [0] * 12 + [1] * 8)  # truncated to 10, nothing supervised is left
    rows, stats = pack([short, long_ok, long_prompt], seq_len=10, pad_token_id=PAD, overlong=overlong)
    if overlong == "truncate":
        assert stats.truncated == 1 and stats.dropped_overlong == 1 and stats.dropped_doc_ids == [2]
        row = next(r for r in rows if 1 in r.doc_ids)
        assert row.input_ids == list(range(1, 11)) and row.loss_mask == [0] * 5 + [1] * 5
    else:
        assert stats.truncated == 0 and stats.dropped_overlong == 2 and stats.dropped_doc_ids == [1, 2]
    assert stats.documents == stats.packed + stats.dropped_overlong


def test_write_and_read_back(tmp_path):
    docs = make_docs(50, seed=1)
    rows, _ = pack(docs, seq_len=48, pad_token_id=PAD)
    index = write_packed(rows, tmp_path / "train", seq_len=48, pad_token_id=PAD, rows_per_file=7)
    assert index["rows"] == len(rows) and len(index["files"]) == -(-len(rows) // 7)
    ds = PackedDataset(tmp_path / "train")
    assert len(ds) == len(rows)
    for i, row in enumerate(rows):
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (48,)
        assert item["loss_mask"].dtype == torch.bool
        assert item["input_ids"].tolist() == row.input_ids
        assert item["loss_mask"].long().tolist() == row.loss_mask
        assert item["doc_ids"].tolist() == row.doc_ids
        # segment ids number the documents 1..k (0 = padding); positions restart in each document
        seg, pos = item["segment_ids"].tolist(), item["position_ids"].tolist()
        start = 0
        for k, n in enumerate(row.doc_lengths, 1):
            assert seg[start:start + n] == [k] * n and pos[start:start + n] == list(range(n))
            start += n
        assert set(seg[start:]) <= {0}


def test_reader_resumes_exactly_and_splits_by_rank(tmp_path):
    rows, _ = pack(make_docs(80, seed=2), seq_len=32, pad_token_id=PAD)
    write_packed(rows, tmp_path / "train", seq_len=32, pad_token_id=PAD, rows_per_file=5)
    full = [r["input_ids"].tolist() for r in PackedDataset(tmp_path / "train")]
    assert len(full) == len(rows)

    ds = PackedDataset(tmp_path)  # a run's data folder works too
    it = iter(ds)
    first = [next(it)["input_ids"].tolist() for _ in range(7)]
    state = ds.state_dict()
    assert state["rows_consumed"] == 7
    fresh = PackedDataset(tmp_path / "train")
    fresh.load_state_dict(state)
    rest = [r["input_ids"].tolist() for r in fresh]
    assert first + rest == full
    # the next pass starts a new epoch from row 0
    assert fresh.state_dict()["rows_consumed"] == len(full)
    assert next(iter(fresh))["input_ids"].tolist() == full[0] and fresh.state_dict()["epoch"] == 1

    world = 3
    shards = [[r["input_ids"].tolist() for r in PackedDataset(tmp_path / "train", rank=k, world_size=world)]
              for k in range(world)]
    assert all(len(s) == len(full) // world for s in shards)
    assert all(s == full[k::world][: len(full) // world] for k, s in enumerate(shards))
    with pytest.raises(ValueError, match="same number of ranks"):
        PackedDataset(tmp_path / "train", rank=0, world_size=2).load_state_dict(state)


def test_reader_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the data stage"):
        PackedDataset(tmp_path)
