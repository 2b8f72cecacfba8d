#!/usr/bin/env python
"""Sweep the decode kernels' launch settings on a GPU (a benchmark, not a test): what each setting costs per call
inside a CUDA graph, as the engine runs them.

* ``silu_mul`` (orthrus_kernels.swiglu): the tile (``MAX_BLOCK`` columns, ``MAX_TILE`` elements per program)
  against eager ``F.silu(g) * u``, on the strided halves of a fused gate/up output, for the decode shapes' rows.
* ``live_attention`` (orthrus_kernels.decode_attn): the split count along the keys (1, 2, 3, 4, 6 and ``auto`` =
  ``num_splits``), AR (T = 1) and drafted (T = K) queries, at live lengths inside a static cache.

    python scripts/sweep_decode_kernels.py --out sweep.json          # about a minute on one H200
    python scripts/sweep_decode_kernels.py --smoke --out /tmp/s.json  # CPU (Triton interpreter): the logic only

Each row: the setting, microseconds per call (median of --reps graph replays of --calls calls each), and for a
kernel setting its largest difference from the reference setting's output (0 where the bits agree).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SILU_SHAPES = {  # name: (rows, N): SmolLM2 (intermediate 1536) and Qwen3-8B (12288) decode passes
    "smollm2_b1_ar": (1, 1536), "smollm2_b16_ar": (16, 1536), "smollm2_b16_k16": (256, 1536),
    "qwen3-8b_b1_ar": (1, 12288), "qwen3-8b_b1_k32": (32, 12288),
}
SILU_TILES = [(1024, 4096), (1024, 1024), (512, 1024), (512, 512), (256, 512), (256, 256)]
ATTN_SHAPES = {  # name: (B, Hq, Hkv, D, slots, T, live length)
    "smollm2_b1_ar": (1, 9, 3, 64, 768, 1, 216), "smollm2_b1_k16": (1, 9, 3, 64, 768, 16, 216),
    "smollm2_b16_ar": (16, 9, 3, 64, 768, 1, 216), "smollm2_b16_k16": (16, 9, 3, 64, 768, 16, 216),
    "smollm2_b16_ar_456": (16, 9, 3, 64, 768, 1, 456), "smollm2_b16_k16_456": (16, 9, 3, 64, 768, 16, 456),
    "qwen3-8b_b1_ar": (1, 32, 8, 128, 512, 1, 116), "qwen3-8b_b1_k32": (1, 32, 8, 128, 512, 32, 116),
}
SPLITS = [None, 1, 2, 3, 4, 6]


def per_call_us(fn, calls: int, reps: int, smoke: bool) -> float | None:
    """Microseconds per call of `fn` replayed `calls` times in one CUDA graph (median over `reps` replays)."""
    if smoke:
        fn()
        return None
    fn()  # compile and warm up outside the graph
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return statistics.median(times)


def sweep_silu(dev, dtype, calls, reps, smoke, shapes):
    from orthrus_kernels import swiglu

    rows_out = []
    saved = swiglu.MAX_BLOCK, swiglu.MAX_TILE
    try:
        for name in shapes:
            R, N = SILU_SHAPES[name]
            gu = torch.randn(R, 2 * N, device=dev, dtype=dtype)
            g, u = gu[:, :N], gu[:, N:]
            ref = F.silu(g) * u
            rows_out.append({"kernel": "silu_mul", "shape": name, "setting": "torch",
                             "us": per_call_us(lambda: F.silu(g) * u, calls, reps, smoke), "max_diff": 0.0})
            for block, tile in SILU_TILES:
                swiglu.MAX_BLOCK, swiglu.MAX_TILE = block, tile
                got = swiglu.silu_mul(g, u)
                rows_out.append({"kernel": "silu_mul", "shape": name, "setting": f"block{block}_tile{tile}",
                                 "us": per_call_us(lambda: swiglu.silu_mul(g, u), calls, reps, smoke),
                                 "max_diff": float((got.float() - ref.float()).abs().max())})
                print(json.dumps(rows_out[-1]), flush=True)
    finally:
        swiglu.MAX_BLOCK, swiglu.MAX_TILE = saved
    return rows_out


def sweep_attn(dev, dtype, calls, reps, smoke, shapes):
    from orthrus_kernels import decode_attn

    rows_out = []
    for name in shapes:
        B, Hq, Hkv, D, S, T, live = ATTN_SHAPES[name]
        if smoke:
            S, live = min(S, 160), min(live, 100)
        q = torch.randn(B, T, Hq, D, device=dev, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(B, Hkv, S, D, device=dev, dtype=dtype) for _ in range(2))
        pos = torch.arange(S, device=dev)
        mask = (pos[None, :] < (live + torch.arange(T, device=dev))[:, None] + 1)[None, None].expand(B, 1, T, S)
        kv_len = decode_attn.live_lengths(mask)
        scale = D ** -0.5
        ref = decode_attn.live_attention(q, k, v, mask, kv_len, scale, splits=1)
        auto = decode_attn.num_splits(B * Hkv * -(-(Hq // Hkv * T) // decode_attn.MAX_BLOCK_M), S, q.device)
        for splits in SPLITS:
            got = decode_attn.live_attention(q, k, v, mask, kv_len, scale, splits=splits)
            rows_out.append({"kernel": "live_attention", "shape": name, "B": B, "T": T, "live": live,
                             "setting": f"auto({auto})" if splits is None else f"splits{splits}",
                             "us": per_call_us(lambda: decode_attn.live_attention(q, k, v, mask, kv_len, scale,
                                                                                   splits=splits),
                                               calls, reps, smoke),
                             "max_diff": float((got.float() - ref.float()).abs().max())})
            print(json.dumps(rows_out[-1]), flush=True)
    return rows_out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--calls", type=int, default=50, help="calls per CUDA graph")
    ap.add_argument("--reps", type=int, default=20, help="graph replays timed")
    ap.add_argument("--silu", nargs="*", default=list(SILU_SHAPES), choices=list(SILU_SHAPES))
    ap.add_argument("--attn", nargs="*", default=list(ATTN_SHAPES), choices=list(ATTN_SHAPES))
    ap.add_argument("--smoke", action="store_true", help="CPU under the Triton interpreter: the logic, no timings")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("sweep_decode_kernels: no CUDA device (use --smoke on a CPU)")
    else:
        dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    rows = sweep_silu(dev, dtype, args.calls, args.reps, args.smoke, args.silu)
    rows += sweep_attn(dev, dtype, args.calls, args.reps, args.smoke, args.attn)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
            "torch": torch.__version__, "dtype": args.dtype, "calls": args.calls, "reps": args.reps,
            "seconds": round(time.time() - t0, 1)}
    with open(args.out, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
