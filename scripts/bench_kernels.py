#!/usr/bin/env python
"""GPU benchmark of orthrus_kernels against the torch paths (not a test).

Loss: forward+backward time (CUDA events, warmup, median of N) and peak memory of
  * fused   -- orthrus_kernels.fused_linear_kl (Triton, never materialises logits)
  * chunked -- orthrus_train.losses.chunked_distill (the project's torch path), or, if that module
               is missing, orthrus_kernels.chunked_linear_kl_reference (noted in the output)
  * naive   -- full (T, V) fp32 logits + log_softmax + autograd
at Qwen3-1.7B (H=2048) and Qwen3-8B (H=4096) shapes, V=151936, T=31*256 tokens, bf16.

Verify: orthrus_train.decode.verify.verify with backend="triton" vs "torch" at B in {1, 8, 32},
K=32, V=151936, for greedy, plain sampling and top-k/top-p sampling.

    python scripts/bench_kernels.py --out results.json          # ~1-3 min on one H100
    python scripts/bench_kernels.py --smoke --out /tmp/s.json   # tiny CPU run of the script logic
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_project():
    """Import orthrus_kernels / orthrus_train from this checkout even when not pip-installed."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    spec = importlib.util.find_spec("orthrus_kernels")
    if spec is None or spec.origin is None:  # missing, or a stale editable namespace entry
        pkg = os.path.join(ROOT, "kernels")
        spec = importlib.util.spec_from_file_location(
            "orthrus_kernels", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["orthrus_kernels"] = mod
        spec.loader.exec_module(mod)
    import orthrus_kernels  # noqa: F401


_import_project()
import orthrus_kernels  # noqa: E402
from orthrus_kernels import chunked_linear_kl_reference, fused_linear_kl  # noqa: E402

try:
    from orthrus_train.losses import chunked_distill as _project_chunked
except Exception as e:  # pragma: no cover - depends on the checkout
    _project_chunked = None
    _PROJECT_IMPORT_ERROR = repr(e)
else:
    _PROJECT_IMPORT_ERROR = None

from orthrus_train.decode import verify as vf  # noqa: E402


# ----------------------------------------------------------------------------------- timing utils
class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, warmup, iters):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), times

    def peak(self, fn):
        """Peak bytes allocated by one call above what was allocated before it."""
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated() - base


# --------------------------------------------------------------------------------------- losses
def naive_kl(hs, ht, w):
    s = (hs @ w.T).float()
    t = (ht @ w.T).float()
    log_pt = torch.log_softmax(t, -1)
    return (log_pt.exp() * (log_pt - torch.log_softmax(s, -1))).sum(-1)


def make_loss_fns(args, backend):
    fns = {}
    fns["fused"] = lambda hs, ht, w: fused_linear_kl(hs, ht, w, backend=backend)
    if _project_chunked is not None:
        fns["chunked"] = lambda hs, ht, w: _project_chunked(hs, ht, w, kind="kl", chunk_size=args.chunk)[0]
        note = "chunked = orthrus_train.losses.chunked_distill"
    else:
        fns["chunked"] = lambda hs, ht, w: chunked_linear_kl_reference(hs, ht, w, chunk_size=args.chunk)
        note = ("chunked = orthrus_kernels.chunked_linear_kl_reference (orthrus_train.losses not "
                f"importable: {_PROJECT_IMPORT_ERROR})")
    if not args.skip_naive:
        fns["naive"] = naive_kl
    return fns, note


def bench_loss(args, device, timer, backend):
    rows = []
    fns, note = make_loss_fns(args, backend)
    print(f"[loss] {note}")
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    for H in args.hidden:
        g = torch.Generator(device=device).manual_seed(0)
        T, V = args.tokens, args.vocab
        w = (torch.randn(V, H, device=device, generator=g) * H ** -0.5).to(dt)
        hs0 = torch.randn(T, H, device=device, generator=g).to(dt)
        ht = (hs0.float() + 0.5 * torch.randn(T, H, device=device, generator=g)).to(dt)
        hs = hs0.clone().requires_grad_()
        results = {}
        for name, fn in fns.items():
            def step(fn=fn, hs=hs, ht=ht, w=w):
                hs.grad = None
                fn(hs, ht, w).mean().backward()

            row = dict(kind="loss", method=name, H=H, V=V, T=T, dtype=str(dt).replace("torch.", ""))
            try:
                ms, all_ms = timer.time(step, args.warmup, args.iters)
                peak = timer.peak(step)
                with torch.no_grad():
                    val = fn(hs, ht, w).float()
                step()
                results[name] = (val, hs.grad.detach().float().clone())
                row.update(ms=ms, ms_all=all_ms, peak_bytes=peak,
                           tokens_per_s=T / (ms / 1e3), status="ok")
            except torch.cuda.OutOfMemoryError as e:
                row.update(status="oom", error=str(e).splitlines()[0])
                torch.cuda.empty_cache()
            rows.append(row)
            peak_s = f"{row['peak_bytes'] / 2**30:8.2f} GiB" if row.get("peak_bytes") is not None else "     n/a"
            print(f"  H={H:5d} {name:8s} " + (f"{row['ms']:9.2f} ms  peak {peak_s}" if row["status"] == "ok" else row["status"]),
                  flush=True)
        # Agreement of each method with the chunked torch path (same inputs).
        if "chunked" in results:
            ref_v, ref_g = results["chunked"]
            for r in rows:
                if r["H"] == H and r["method"] in results and r["method"] != "chunked":
                    v, gr = results[r["method"]]
                    r["max_abs_loss_diff_vs_chunked"] = float((v - ref_v).abs().max())
                    r["grad_rel_diff_vs_chunked"] = float((gr - ref_g).abs().max() / ref_g.abs().max().clamp_min(1e-30))
        del w, hs0, ht, hs, results
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, note


# --------------------------------------------------------------------------------------- verify
def bench_verify(args, device, timer, backend):
    rows = []
    dt = getattr(torch, args.verify_dtype)
    modes = [("greedy", dict(temperature=0.0)), ("sample", dict(temperature=1.0)),
             ("topk50_topp0.9", dict(temperature=0.8, top_k=50, top_p=0.9))]
    K, V = args.K, args.vocab
    for B in args.batches:
        g = torch.Generator(device=device).manual_seed(B)
        p = (torch.randn(B, K, V, device=device, generator=g) * 3).to(dt)
        q = (p[:, : K - 1].float() + torch.randn(B, K - 1, V, device=device, generator=g)).to(dt)
        d = q.float().argmax(-1)
        u = torch.rand(B, K, device=device, generator=g)
        for mode, kw in modes:
            outs = {}
            for be in dict.fromkeys((backend, "torch")):  # once when both are torch
                fn = lambda d=d, q=q, p=p, u=u, be=be, kw=kw: vf.verify(d, q, p, u, backend=be, **kw)  # noqa: E731
                ms, all_ms = timer.time(fn, args.warmup, args.iters)
                outs[be] = fn()
                rows.append(dict(kind="verify", backend=be, mode=mode, B=B, K=K, V=V,
                                 dtype=args.verify_dtype, ms=ms, ms_all=all_ms))
                print(f"  B={B:3d} {mode:15s} {be:7s} {ms:9.3f} ms", flush=True)
            if backend != "torch":  # same uniforms: the kernel must reproduce the reference
                a, b = outs[backend], outs["torch"]
                agree = float(((a[0] == b[0]) & (a[1] == b[1])).float().mean())
                rows[-2]["agreement_with_torch"] = agree
        del p, q
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--tokens", type=int, default=31 * 256, help="tokens per loss call (T)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096], help="H values (Qwen3-1.7B, -8B)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk", type=int, default=1024, help="chunk size of the chunked torch path")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="verify batch sizes")
    ap.add_argument("-K", type=int, default=32, help="verify block size (K-1 drafts)")
    ap.add_argument("--verify-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-naive", action="store_true", help="skip the full-logits baseline")
    ap.add_argument("--skip-loss", action="store_true")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (checks the script, times nothing useful)")
    args = ap.parse_args(argv)

    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.batches, args.K = 40, [32], 1000, [1, 3], 5
        args.warmup, args.iters, args.chunk = 1, 2, 16
        device = torch.device("cpu")
        backend = "triton" if (orthrus_kernels.HAS_TRITON and orthrus_kernels.interpreting()) else "torch"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_kernels.py needs a CUDA GPU (use --smoke to exercise it on CPU)")
        device = torch.device("cuda")
        backend = "triton"
    timer = Timer(device)

    meta = dict(torch=torch.__version__, python=platform.python_version(), device=str(device),
                args=vars(args), backend=backend)
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    print(f"[bench] {meta.get('gpu', 'cpu')} torch {meta['torch']} triton {meta['triton']} backend={backend}")

    t0 = time.time()
    result = dict(meta=meta, loss=[], verify=[])
    if not args.skip_loss:
        result["loss"], result["meta"]["loss_note"] = bench_loss(args, device, timer, backend)
    if not args.skip_verify:
        print("[verify]")
        result["verify"] = bench_verify(args, device, timer, backend)
    result["meta"]["wall_s"] = time.time() - t0

    print("\n| kind | method/backend | shape | ms (median) | peak GiB | note |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["loss"]:
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") is not None else "-"
        ms = f"{r['ms']:.2f}" if r["status"] == "ok" else r["status"]
        note = ""
        if "grad_rel_diff_vs_chunked" in r:
            note = f"dloss {r['max_abs_loss_diff_vs_chunked']:.1e}, dgrad {r['grad_rel_diff_vs_chunked']:.1e}"
        print(f"| loss | {r['method']} | T={r['T']} H={r['H']} V={r['V']} | {ms} | {peak} | {note} |")
    for r in result["verify"]:
        note = f"agree {r['agreement_with_torch']:.3f}" if "agreement_with_torch" in r else ""
        print(f"| verify {r['mode']} | {r['backend']} | B={r['B']} K={r['K']} V={r['V']} | {r['ms']:.3f} | - | {note} |")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out} ({result['meta']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
