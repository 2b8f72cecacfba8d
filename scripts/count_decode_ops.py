#!/usr/bin/env python
"""Count the aten ops (not views) of one decode step on the CPU: a GPU-free proxy for the kernels a CUDA graph
replays (launch-bound decode steps cost ~1-2 us per kernel). See `orthrus_train/decode/opcount.py`.

For each shape: one AR step and one drafted step (propose + verify, K=16) of `DecodeEngine`, at batch 1 and 16,
greedy and sampled (T=1, top-k 50, top-p 0.9). Reduced width by default (same layers and heads, small
hidden / MLP / vocab: op counts do not depend on them); --full-width builds the real shape (slow, big).

    python scripts/count_decode_ops.py --shape smollm2-135m qwen3-8b --out-dir docs/results/2026-11-30-decode --tag after
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from orthrus_train.decode.opcount import SHAPES, count_steps

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["smollm2-135m", "qwen3-8b"], choices=SHAPES)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--full-width", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--dtype", default="bfloat16", help="bf16 as on the GPU (fp32 skips the norms' casts)")
    ap.add_argument("--out-dir", default=None, help="write ops_<tag>_<shape>.json here")
    ap.add_argument("--tag", default="after")
    a = ap.parse_args(argv)
    for shape in a.shape:
        res = count_steps(shape, tuple(a.batch), a.block_size, reduced=not a.full_width, top=a.top,
                          dtype=getattr(torch, a.dtype))
        print(f"{shape} ({res['layers']} layers, hidden {res['hidden_size']}, vocab {res['vocab_size']}):")
        for r in res["rows"]:
            ar, sp = r["ar"], r["spec"]
            print(f"  B={r['batch']:<3} {r['sampling']:<8} AR {ar['ops_per_step']:>5} ops ({ar['ops_per_layer']}/layer "
                  f"+ {ar['ops_outside_layers']})   drafted {sp['ops_per_step']:>5} ops ({sp['ops_per_layer']}/layer + "
                  f"{sp['ops_outside_layers']})   x{r['spec_over_ar_ops']}   "
                  f"syncs {ar['host_syncs']}/{sp['host_syncs']}")
        if a.out_dir:
            out = Path(a.out_dir) / f"ops_{a.tag}_{shape}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1) + "\n")
            print(f"  -> {out}")


if __name__ == "__main__":
    main()
