#!/usr/bin/env python
"""GPU profile (not a test) of one decoding step: what a drafted step (propose + verify) costs against an
AR step of the same engine, and where the time goes.

Random weights of a SmolLM2-135M-shaped Llama (the real-model run's backbone; --shape qwen3-0.6b etc. for
a Qwen3 shape) at batch B with a static cache of S slots and prompts of P tokens. For each mode it replays
the engine's step (CUDA graphs, as the eval runs it) --steps times and reports ms per step, then profiles
one eager step and lists the kernels that take the most GPU time.

    python scripts/profile_decode_step.py --batch 16 --prompt-len 100 1000 --out profile.json

One JSON per shape, with the roofline of an AR step (the next GPU session: one command per shape):

    python scripts/profile_decode_step.py --shape qwen3-8b --batch 1 16 --prompt-len 100 1000 --attn auto \
        --count-ops --out docs/results/<date>-decode/qwen3-8b.json

Every row then has "ar_floor_ms" = bytes of weights an AR step reads / the device's copy bandwidth (measured
here with a large device-to-device copy: "copy_gbps"), "ar_over_floor" = ar_ms / floor and "spec_over_ar".
--count-ops adds the aten op counts of one eager step of each kind (`orthrus_train/decode/opcount.py`; the
CPU-only op counter is `scripts/count_decode_ops.py`). --shape takes several shapes; --out may then hold
"{shape}" or name a directory (then <dir>/<shape>.json). --tiny: reduced width (CPU smoke runs).
--norm torch triton: also time the decode passes' RMSNorm as one Triton kernel (layers.set_decode_norm); each
row records its "norm". --rope torch triton: the same for their RoPE (layers.set_decode_rope; "rope").
--fused-argmax off on: also time the engine with its fused greedy LM head (`DecodeEngine(fused_argmax=True)`:
greedy drafts, the greedy verify and the AR step take their argmax from orthrus_kernels.lm_head_argmax without the
logits); each row records "fused_argmax" (asked), "fused_argmax_active" (it ran) and "fused_argmax_error" (why
not). The steps are timed greedy, so with it on both LM heads of a drafted step and the AR step's take the kernel.
--lm-head: also time the LM head alone at the step's token counts (B: AR, B*(K-1): draft, B*K: verify), the
logits + argmax against the kernel (CUDA events, median of 20 after 3 untimed): "lm_head" rows with unfused_us,
fused_us and "same_ids" (the two argmaxes agree on every token; they may differ where rounded logits nearly tie).
The next GPU lease's command for the fused greedy LM head (SmolLM2 shape, batch 16, K = 16, as profiled):

    python scripts/profile_decode_step.py --batch 16 --prompt-len 100 1000 --attn auto --fused-argmax off on \
        --lm-head --profile --out docs/results/<date>-lmhead/smollm2-135m.json

(and --shape qwen3-8b --batch 1 16 for the bandwidth-bound head). Nothing of it has been timed on a GPU yet.
--kv-write torch triton: the K/V cache write as two scatter_ after the RoPE, or in the RoPE kernel itself
(layers.set_decode_kv_write; "kv_write"; "triton" applies only where the RoPE is "triton": "kv_write_resolved"
says what ran). --mlp torch triton: the SwiGLU product as silu + mul or one kernel (layers.set_decode_mlp; "mlp").
Every row also holds "decode_kernels", what each switch resolved to on the device.

The next lease (kvrope branch: one step's kernels fused; nothing of it timed yet): the unfused Triton path against
the fused one, SmolLM2 at batch 16 and Qwen3-8B at batch 1, CUDA-graph step times, op counts and one profiled eager
step each (after `pip install -e .`):

    python scripts/profile_decode_step.py --shape smollm2-135m --batch 16 --prompt-len 200 --attn auto \
        --kv-write torch triton --mlp torch triton --count-ops --profile --out docs/results/<date>-kvrope/smollm2.json
    python scripts/profile_decode_step.py --shape qwen3-8b --batch 1 --prompt-len 100 --attn auto \
        --kv-write torch triton --mlp torch triton --count-ops --profile --out docs/results/<date>-kvrope/qwen3-8b.json

and the tests of the kernels on the GPU (bit-identity there: the MLP product's expf against torch's, subnormal
gates, the fused K/V write against RoPE kernel + scatter_; every check exact on CUDA):

    python -m pytest -q tests/model/test_decode_kv_write.py tests/model/test_decode_mlp.py \
        tests/model/test_decode_compile.py tests/eval/test_op_budget.py
--refill N [N ...]: also "refills", one continuous-batching refill of N rows of P tokens for each N (the eval spends about 0.1 s
per fill on SmolLM2 at batch 16: docs/benchmarks.md, session 14); with --profile its host and device time;
"staged_refill_ms": the same refill from prompts staged ahead (`generate_many`: a copy of cache rows, no pass);
"graph_refill_ms" (with CUDA graphs): the same refill with its prefill pass replayed as a CUDA graph (`PrefillGraphs`;
"refill_ms" is the eager pass's).
--refill-lengths L [L ...]: "refill_lengths", one refill of --refill-rows rows of each prompt length L in turn (each
length new to the process), then the same lengths again: "first_ms" against "again_ms" tells a cost paid once per
new prompt shape (kernel specialisation, allocator growth) from the steady cost of a refill (session 15: the eval's
fills took 65-117 ms where a repeated same-length refill took 23-26 ms).
"""
from __future__ import annotations

import argparse
import importlib.util
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


def weight_bytes_per_ar_step(model) -> int:
    """Bytes of the weights one AR (verify) pass reads: every backbone parameter except the draft twins and the
    input embedding table (one row per token is gathered; a tied lm_head is the same tensor and counts once)."""
    bb = model.backbone
    emb = bb.get_input_embeddings().weight
    head = bb.get_output_embeddings().weight
    seen, total = set(), 0
    for name, p in bb.named_parameters(remove_duplicate=False):
        if "_diff." in name or (p is emb and p is not head) or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def copy_bandwidth_gbps(dev, nbytes: int = 2 << 30) -> float | None:
    """Device memory bandwidth from a large device-to-device copy (bytes read + written per second, GB/s)."""
    if dev.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 10
    start.record()
    for _ in range(n):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1e3 / n
    del src, dst
    return 2 * nbytes / s / 1e9


def time_refill(eng, prompts, n: int, sync, profile: bool, top: int, dev) -> dict:
    """What one continuous-batching refill of `n` rows costs (`DecodeEngine._refill`: the eager prefill pass into
    the scratch cache, the copies into the rows' slots, the rows armed), host-synchronized as the eval times it:
    the median of 5 after one untimed. With profile: one refill under the profiler, its host (CPU) and device
    time in all and the ops that take the most host time (a launch-bound pass shows host >> device)."""
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    rows, seeds = list(range(n)), list(range(n))

    def median_refill_ms() -> float:
        times = []
        for _ in range(6):
            sync()
            t = time.perf_counter()
            eng._refill(rows, prompts[:n], seeds, 10 ** 6)
            sync()
            times.append(time.perf_counter() - t)
        timed = sorted(times[1:])
        return timed[len(timed) // 2] * 1e3

    graphs_on = eng.prefill_graphs
    eng.prefill_graphs = False  # refill_ms: the eager pass (as before prefill graphs), its ops profiled below
    out = {"refill_rows": n, "refill_ms": median_refill_ms()}
    if eng.cuda_graphs and graphs_on:  # the same refill, its pass replayed (the first run captures: untimed)
        eng.prefill_graphs = True
        out["graph_refill_ms"] = median_refill_ms()
        if eng.prefill_graph_error:
            out["prefill_graph_error"] = eng.prefill_graph_error
        eng.prefill_graphs = False
    # the same rows from prompts staged ahead (generate_many: one pass stages many prompts, a refill copies rows)
    from orthrus_train.decode.engine import _Staged

    staged = _Staged()
    pool = [prompts[i % len(prompts)] for i in range(7 * n)]
    eng._refill_staged(rows, pool, 0, seeds, 10 ** 6, staged)  # stages up to prefill_ahead_tokens (untimed)
    times = []
    while staged.left >= n and len(times) < 6:
        sync()
        t = time.perf_counter()
        eng._refill_staged(rows, pool, staged.first + staged.used, seeds, 10 ** 6, staged)
        sync()
        times.append(time.perf_counter() - t)
    if len(times) > 1:
        timed = sorted(times[1:])
        out["staged_refill_ms"] = timed[len(timed) // 2] * 1e3
    if profile:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with prof_ctx(activities=acts) as prof:
            eng._refill(rows, prompts[:n], seeds, 10 ** 6)
            sync()
        evs = prof.key_averages()
        out["refill_ops"] = sum(e.count for e in evs if e.key.startswith("aten::"))
        out["refill_cpu_us"] = sum(e.self_cpu_time_total for e in evs)
        out["refill_device_us"] = sum(getattr(e, "self_device_time_total", 0) for e in evs)
        out["refill_top"] = [{"name": e.key[:90], "us": round(e.self_cpu_time_total, 1), "calls": e.count}
                             for e in sorted(evs, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]]
    eng.prefill_graphs = graphs_on
    return out


def time_refill_lengths(eng, V: int, lengths, n: int, sync) -> list[dict]:
    """One refill of `n` rows per prompt length (random tokens), every length once in turn and then all again:
    [{"prompt_len", "rows", "first_ms", "again_ms"}] (host-synchronized, as the eval times a fill). Eager passes, as
    session 15 measured them (a replayed pass would time its capture first: `time_refill`'s graph_refill_ms)."""
    g = torch.Generator().manual_seed(1)
    rows = list(range(n))
    out = []
    graphs_on, eng.prefill_graphs = eng.prefill_graphs, False
    for rnd in ("first_ms", "again_ms"):
        for i, L in enumerate(lengths):
            prompts = [torch.randint(0, V, (L,), generator=g).tolist() for _ in rows]
            sync()
            t = time.perf_counter()
            eng._refill(rows, prompts, rows, 10 ** 6)
            sync()
            ms = (time.perf_counter() - t) * 1e3
            if rnd == "first_ms":
                out.append({"prompt_len": L, "rows": n, "first_ms": ms})
            else:
                out[i]["again_ms"] = ms
    eng.prefill_graphs = graphs_on
    return out


def time_lm_heads(model, B: int, K: int, dev, sync, reps: int = 20) -> list[dict]:
    """The LM head alone at a decode step's token counts (B: the AR step, B*(K-1): the draft, B*K: the verify) on
    random hidden states: the logits and their argmax (what the engine runs without fused_argmax) against
    orthrus_kernels.lm_head_argmax. Per count: median microseconds of `reps` calls after 3 untimed (CUDA events on a
    GPU, wall clock elsewhere), "same_ids" (both pick the same token for every row), or "fused_error" where the
    kernel cannot run here."""
    import torch.nn.functional as F

    W = model.lm_weight()
    g = torch.Generator().manual_seed(0)
    out = []
    try:
        from orthrus_kernels import lm_head_argmax as lha
    except ImportError as e:
        lha, err = None, f"{type(e).__name__}: {e}"

    def median_us(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e) * 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
        return sorted(times)[len(times) // 2]

    for n in sorted({B, B * (K - 1), B * K}):
        h = torch.randn(n, W.shape[1], generator=g).to(dev, W.dtype)
        with torch.no_grad():
            row = {"tokens": n, "vocab": W.shape[0], "hidden": W.shape[1],
                   "unfused_us": median_us(lambda: F.linear(h, W).argmax(-1))}
            try:
                if lha is None:
                    raise RuntimeError(err)
                row["fused_us"] = median_us(lambda: lha.lm_head_argmax(h, W))
                row["same_ids"] = bool(torch.equal(lha.lm_head_argmax(h, W), F.linear(h, W).argmax(-1)))
            except Exception as e:  # noqa: BLE001 - a CPU without the interpreter, a compile failure: recorded
                row["fused_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        sync()
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--tiny", action="store_true", help="reduced width and 2 layers (CPU smoke runs)")
    ap.add_argument("--count-ops", action="store_true", help="also count the aten ops of one eager step of each kind")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--attn", nargs="+", default=["auto", "sdpa", "fold", "math"],
                    help="decode attention implementations to compare (orthrus_train.model.layers."
                         "DECODE_ATTN_CHOICES; 'live', the Triton kernel reading only each row's live cache "
                         "length, is opt-in: CUDA, or TRITON_INTERPRET=1 for a CPU smoke run)")
    ap.add_argument("--norm", nargs="+", default=["auto"],
                    help="decode RMSNorm implementations to compare (orthrus_train.model.layers.DECODE_NORM_CHOICES: "
                         "'torch', 7 eager kernels per norm; 'triton', one kernel (CUDA, or TRITON_INTERPRET=1 for a "
                         "CPU smoke run); 'auto' (default): triton on CUDA after a probe, else torch; the row "
                         "records what ran as norm_resolved)")
    ap.add_argument("--rope", nargs="+", default=["auto"],
                    help="decode RoPE implementations to compare (orthrus_train.model.layers.DECODE_ROPE_CHOICES: "
                         "'torch', 4 eager kernels per RoPE; 'triton', one kernel; 'auto' (default) as --norm; "
                         "rope_resolved in the row)")
    ap.add_argument("--fused-argmax", nargs="+", default=["off"], choices=["off", "on"],
                    help="the engine's fused greedy LM head (DecodeEngine(fused_argmax=...)): 'off' (default) the "
                         "logits and argmax, 'on' one Triton kernel (CUDA, or TRITON_INTERPRET=1 for a CPU smoke run; "
                         "where it cannot run the row records fused_argmax_error and the logits' path ran)")
    ap.add_argument("--lm-head", action="store_true",
                    help="also time the LM head alone at the step's token counts: logits + argmax vs the kernel")
    ap.add_argument("--kv-write", nargs="+", default=["auto"],
                    help="decode K/V cache writes to compare (layers.DECODE_KV_WRITE_CHOICES: 'torch', two scatter_ "
                         "after the RoPE; 'triton', stored by the RoPE kernel itself, where the RoPE is 'triton'; "
                         "'auto' (default) as --norm; kv_write_resolved in the row)")
    ap.add_argument("--mlp", nargs="+", default=["auto"],
                    help="decode SwiGLU products to compare (layers.DECODE_MLP_CHOICES: 'torch', silu + mul; "
                         "'triton', one kernel (SiLU MLPs); 'auto' (default) as --norm; mlp_resolved in the row)")
    ap.add_argument("--qk-norm-in-rope", nargs="+", default=["on"], choices=["off", "on"],
                    help="Qwen3's joint q/k norm inside the RoPE + K/V write kernel ('on', default, where the norm and "
                         "the K/V write are 'triton': layers.QK_NORM_IN_ROPE) or as its own norm kernel ('off'); both "
                         "to compare")
    ap.add_argument("--compile", action="store_true", help="torch.compile the step functions (compile_steps)")
    ap.add_argument("--no-fuse", action="store_true",
                    help="separate q/k/v and gate/up matmuls (the engine before session 5), for comparison")
    ap.add_argument("--profile", action="store_true", help="also list the top kernels of one eager step")
    ap.add_argument("--refill", type=int, nargs="+", default=[], metavar="N",
                    help="also time one continuous-batching refill of N rows, for each N (the eval's prefill "
                         "cost; with --profile, where its host time goes)")
    ap.add_argument("--refill-lengths", type=int, nargs="+", default=[], metavar="L",
                    help="also time one refill per prompt length L, each new length once and then all again")
    ap.add_argument("--refill-rows", type=int, default=4, help="rows per --refill-lengths refill")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    forced = [f"--{k.replace('_', '-')} {v}" for k in ("attn", "norm", "rope", "kv_write", "mlp")
              for v in getattr(a, k) if v in ("live", "triton")]
    if forced and importlib.util.find_spec("orthrus_kernels") is None:
        ap.error(f"{' '.join(forced)} needs the Triton kernels, and orthrus_kernels is not importable: install the "
                 "project (`pip install -e .`), which maps kernels/ to it")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gbps = copy_bandwidth_gbps(dev)
    if gbps:
        print(f"device copy bandwidth: {gbps:.0f} GB/s (read + write)", flush=True)
    if len(a.shape) > 1 and a.out and "{shape}" not in a.out and not Path(a.out).is_dir():
        ap.error("several shapes: --out must hold '{shape}' or name a directory")
    for shape in a.shape:
        out = a.out
        if out and Path(out).is_dir():
            out = str(Path(out) / f"{shape}.json")
        elif out:
            out = out.replace("{shape}", shape)
        profile_shape(a, shape, dev, gbps, out)


def profile_shape(a, shape, dev, gbps, out):
    from orthrus_train.decode import opcount
    from orthrus_train.decode.engine import DecodeEngine, SamplingParams
    from orthrus_train.model import OrthrusModel, build_random, layers
    from orthrus_train.model.backbones import qwen3_shape

    dtype = getattr(torch, a.dtype)
    if a.tiny:
        cfg, _ = opcount.shape_config(shape, reduced=True, layers=2)
    else:
        cfg = smollm2_shape() if shape == "smollm2-135m" else qwen3_shape(shape)
    bb = build_random(cfg, seed=0).to(dev, dtype)
    V = bb.get_input_embeddings().weight.shape[0]
    m = OrthrusModel(bb, block_size=a.block_size, vocab_len=V).to(dev, dtype).eval().requires_grad_(False)
    wbytes = weight_bytes_per_ar_step(m)
    floor_ms = wbytes / (gbps * 1e9) * 1e3 if gbps else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results = []
    for qn, fa, rp, nrm, kvw, mlp, impl, B, P in [
            (qn, f, r, n, k, ml, i, b, p) for qn in a.qk_norm_in_rope for f in a.fused_argmax for r in a.rope
            for n in a.norm for k in a.kv_write for ml in a.mlp for i in a.attn for b in a.batch
            for p in a.prompt_len]:
        layers.set_decode_qk_norm_in_rope(qn == "on")
        layers.set_decode_rope(rp)
        layers.set_decode_norm(nrm)
        layers.set_decode_kv_write(kvw)
        layers.set_decode_mlp(mlp)
        layers.set_decode_attention(impl)
        S = -(-(P + a.steps * a.block_size + a.block_size + 2) // 256) * 256
        eng = DecodeEngine(m, B, S, use_cuda_graphs=dev.type == "cuda", compile_steps=a.compile,
                           fuse_projections=not a.no_fuse, fused_argmax=fa == "on")
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, V, (P,), generator=g).tolist() for _ in range(B)]
        row = {"attn": impl, "norm": nrm, "rope": rp, "norm_resolved": layers.resolved_decode_norm(dev),
               "rope_resolved": layers.resolved_decode_rope(dev), "kv_write": kvw,
               "kv_write_resolved": layers.resolved_decode_kv_write(dev), "mlp": mlp,
               "mlp_resolved": layers.resolved_decode_mlp(dev), "decode_kernels": layers.resolved_decode_kernels(dev),
               "compile": a.compile,
               "fused_projections": not a.no_fuse, "batch": B, "prompt_len": P, "slots": S,
               "fused_argmax": fa, "fused_argmax_active": eng.fused_argmax_active,
               "qk_norm_in_rope": qn}
        if eng.fused_argmax_error:
            row["fused_argmax_error"] = eng.fused_argmax_error
        fusion = eng._fused()  # the fused decode projections, attached as during the engine's own calls
        fusion.__enter__()
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
            eager = [eng._propose_step, eng._verify_step] if mode == "spec" else [eng._verify_step]
            if a.count_ops:  # one eager step under the op counter (greedy, as timed)
                eng._prefill(prompts, 10 ** 6, list(range(B)), [])
                with torch.no_grad(), opcount.counting() as c:
                    for f in eager:
                        f()
                    sync()
                row[f"{mode}_ops"] = c.total
                row[f"{mode}_top_ops"] = dict(c.ops.most_common(a.top))
            if not a.profile:
                continue
            # where the time goes: one eager step under the profiler
            eng._prefill(prompts, 10 ** 6, list(range(B)), [])
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
        if a.lm_head and fa == a.fused_argmax[0]:  # (once per batch and prompt length: the head ignores both)
            row["lm_head"] = time_lm_heads(m, B, a.block_size, dev, sync)
            for r in row["lm_head"]:
                print(json.dumps(r), flush=True)
        if a.refill:
            row["refills"] = [time_refill(eng, prompts, min(n, B), sync, a.profile, a.top, dev) for n in a.refill]
        if a.refill_lengths:
            row["refill_lengths"] = time_refill_lengths(eng, V, a.refill_lengths, min(a.refill_rows, B), sync)
            for r in row["refill_lengths"]:
                print(json.dumps(r), flush=True)
        fusion.__exit__(None, None, None)
        row["spec_over_ar"] = row["spec_ms_per_step"] / row["ar_ms_per_step"]
        # the roofline of an AR step: its weights read once at the device's copy bandwidth (KV cache reads and
        # the logits' write come on top: kv_read_mb)
        row["ar_floor_ms"] = floor_ms
        row["ar_over_floor"] = row["ar_ms_per_step"] / floor_ms if floor_ms else None
        row["kv_read_mb"] = sum(t.numel() * t.element_size() for t in eng._st.cache.k + eng._st.cache.v) / 1e6
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_top") and not k.endswith("_top_ops")
                          and k != "refills"}), flush=True)
        for r in row.get("refills", []):
            print(json.dumps({k: v for k, v in r.items() if k != "refill_top"}), flush=True)
        tops = [(m, row[f"{m}_top"]) for m in ("spec", "ar")] + [
            (f"refill{r['refill_rows']}", r["refill_top"]) for r in row.get("refills", [])] if a.profile else []
        for mode, top in tops:
            for t in top:
                print(f"  {mode:<9}{t['us']:>10.1f} us {t['calls']:>5}x  {t['name']}")
        results.append(row)
        del eng
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({
            "shape": shape, "tiny": a.tiny, "dtype": a.dtype, "block_size": a.block_size,
            "layers": cfg.num_hidden_layers, "weight_bytes_per_ar_step": wbytes, "copy_gbps": gbps,
            "ar_floor_ms": floor_ms,
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "rows": results}, indent=1))
        print(f"-> {out}", flush=True)


if __name__ == "__main__":
    main()
