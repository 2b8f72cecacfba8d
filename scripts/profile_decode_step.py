#!/usr/bin/env python
"""GPU profile (not a test) of one decoding step: what a drafted step (propose + verify) costs against an
AR step of the same engine, and where the time goes.

Random weights of a SmolLM2-135M-shaped Llama (the real-model run's backbone; --shape qwen3-0.6b etc. for
a Qwen3 shape) at batch B with a static cache of S slots and prompts of P tokens. For each mode it replays
the engine's step (CUDA graphs, as the eval runs it) --steps times and reports ms per step, then profiles
one eager step and lists the kernels that take the most GPU time.

    python scripts/profile_decode_step.py --batch 16 --prompt-len 100 1000 --out profile.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def smollm2_shape():
    from orthrus_train.model import tiny_config
    return tiny_config("llama", vocab_size=49152, hidden_size=576, layers=30, heads=9, kv_heads=3,
                       intermediate=1536, max_positions=8192, head_dim=64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--attn", nargs="+", default=["auto", "sdpa", "fold", "math"],
                    help="decode attention implementations to compare (orthrus_train.model.layers)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the step functions (compile_steps)")
    ap.add_argument("--profile", action="store_true", help="also list the top kernels of one eager step")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from orthrus_train.decode.engine import DecodeEngine, SamplingParams
    from orthrus_train.model import OrthrusModel, build_random, layers
    from orthrus_train.model.backbones import qwen3_shape

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype)
    cfg = smollm2_shape() if a.shape == "smollm2-135m" else qwen3_shape(a.shape)
    bb = build_random(cfg, seed=0).to(dev, dtype)
    V = bb.get_input_embeddings().weight.shape[0]
    m = OrthrusModel(bb, block_size=a.block_size, vocab_len=V).to(dev, dtype).eval().requires_grad_(False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results = []
    for impl, B, P in [(i, b, p) for i in a.attn for b in a.batch for p in a.prompt_len]:
        layers.set_decode_attention(impl)
        S = -(-(P + a.steps * a.block_size + a.block_size + 2) // 256) * 256
        eng = DecodeEngine(m, B, S, use_cuda_graphs=dev.type == "cuda", compile_steps=a.compile)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, V, (P,), generator=g).tolist() for _ in range(B)]
        row = {"attn": impl, "compile": a.compile, "batch": B, "prompt_len": P, "slots": S}
        for mode in ("ar", "spec"):
            eng._mode, eng._sampling = mode, SamplingParams(0.0)
            t_c = time.perf_counter()
            fns = eng._steps()
            row[f"{mode}_setup_s"] = time.perf_counter() - t_c  # compilation + graph capture
            eng._prefill(prompts, 10 ** 6, list(range(B)), [])
            for f in fns:  # one untimed step
                f()
            sync()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                for f in fns:
                    f()
            sync()
            row[f"{mode}_ms_per_step"] = (time.perf_counter() - t0) * 1e3 / a.steps
            if not a.profile:
                continue
            # where the time goes: one eager step under the profiler
            eng._prefill(prompts, 10 ** 6, list(range(B)), [])
            eager = [eng._propose_step, eng._verify_step] if mode == "spec" else [eng._verify_step]
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for f in eager:
                    f()
                sync()
            key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            evs = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
            kernels = [e for e in evs if dev.type != "cuda" or getattr(e, "device_type", None) is not None]
            row[f"{mode}_top"] = [{"name": e.key[:90], "us": round(getattr(e, key, 0), 1), "calls": e.count}
                                  for e in kernels[: a.top]]
            if dev.type == "cuda":
                row[f"{mode}_kernels"] = sum(e.count for e in prof.key_averages()
                                             if getattr(e, "self_device_time_total", 0) > 0)
                row[f"{mode}_gpu_us_eager"] = sum(getattr(e, "self_device_time_total", 0)
                                                  for e in prof.key_averages())
        row["spec_over_ar"] = row["spec_ms_per_step"] / row["ar_ms_per_step"]
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_top")}), flush=True)
        for mode in ("spec", "ar") if a.profile else ():
            for t in row[f"{mode}_top"]:
                print(f"  {mode:<5}{t['us']:>10.1f} us {t['calls']:>5}x  {t['name']}")
        results.append(row)
        del eng
    if a.out:
        Path(a.out).write_text(json.dumps({"shape": a.shape, "dtype": a.dtype, "block_size": a.block_size,
                                           "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                                           "torch": torch.__version__, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
