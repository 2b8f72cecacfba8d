#!/usr/bin/env python
"""Count the aten ops (not views) of one decode step on the CPU: a GPU-free proxy for the kernels a CUDA graph
replays (launch-bound decode steps cost ~1-2 us per kernel). See `orthrus_train/decode/opcount.py`.

For each shape: one AR step and one drafted step (propose + verify, K=16) of `DecodeEngine`, at batch 1 and 16,
greedy and sampled (T=1, top-k 50, top-p 0.9). Reduced width by default (same layers and heads, small
hidden / MLP / vocab: op counts do not depend on them); --full-width builds the real shape (slow, big).

    python scripts/count_decode_ops.py --shape smollm2-135m qwen3-8b --out-dir docs/results/2026-11-30-decode --tag after

--norm / --rope / --kv-write / --mlp pick the decode kernels (orthrus_train.model.layers: set_decode_norm,
set_decode_rope, set_decode_kv_write, set_decode_mlp; "auto", the default, is "torch" on a CPU). Each Triton launch
counts as one op (orthrus_train/decode/opcount.py), so with TRITON_INTERPRET=1 (set before the kernels are first
imported: on the command line) the count is that of a GPU step's kernels, e.g. the fused path against the unfused
Triton path (slow: the interpreter runs every kernel on the CPU):

    TRITON_INTERPRET=1 python scripts/count_decode_ops.py --extrapolate --norm triton --rope triton \
        --kv-write torch --mlp torch --tag unfused
    TRITON_INTERPRET=1 python scripts/count_decode_ops.py --extrapolate --norm triton --rope triton \
        --kv-write triton --mlp triton --tag fused

--extrapolate counts the 1- and 2-layer models only and extrapolates to the shape's layers (exact: counts are
linear in the layer count; the interpreter takes many minutes over a 30-layer step). The JSON records what ran
("decode_kernels", resolved on the CPU) and "extrapolated".
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
    ap.add_argument("--extrapolate", action="store_true",
                    help="count the 1- and 2-layer models only, extrapolated to the shape's layers (exact; fast)")
    for name in ("norm", "rope", "kv-write", "mlp"):
        ap.add_argument(f"--{name}", default="auto", choices=("auto", "torch", "triton"),
                        help=f"the decode {name.replace('-', ' ')} (layers.set_decode_{name.replace('-', '_')}); "
                             "triton on a CPU needs TRITON_INTERPRET=1")
    a = ap.parse_args(argv)
    from orthrus_train.model import layers

    layers.set_decode_norm(a.norm)
    layers.set_decode_rope(a.rope)
    layers.set_decode_kv_write(a.kv_write)
    layers.set_decode_mlp(a.mlp)
    for shape in a.shape:
        res = count_steps(shape, tuple(a.batch), a.block_size, reduced=not a.full_width, top=a.top,
                          dtype=getattr(torch, a.dtype), extrapolate=a.extrapolate)
        print(f"{shape} ({res['layers']} layers, hidden {res['hidden_size']}, vocab {res['vocab_size']}; decode "
              f"kernels {res['decode_kernels']}):")
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
