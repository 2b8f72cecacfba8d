"""Training-step benchmark (not a test): tokens/s, MFU and peak memory per GPU for a Qwen3 shape with
random weights, through the real engine (DeepSpeed ZeRO, the same step as a recipe).

    python scripts/bench_train.py --shape qwen3-8b --steps 8 --out bench.json
    torchrun --nproc_per_node 4 scripts/bench_train.py --shape qwen3-8b --zero 3 --out bench.json
    torchrun --nproc_per_node 4 scripts/bench_train.py --recipe qwen3-72b --shape qwen3-72b --zero 3
    python scripts/bench_train.py --recipe smollm2-135m --model smol.gguf --vocab 49152 --seq-len 1024 \
        --anchors 64 --block 16 --micro 16 32 64 --out bench.json     # a real model file; one row per micro batch
    python scripts/bench_train.py ... --profile-steps 3 --profile-out prof/   # + where each step's time goes

Rows are synthetic (random tokens, the second half marked as response), which costs exactly what real
rows cost. The first `--warmup` steps (compilation, allocator) are excluded from the averages.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class SyntheticRows:
    def __init__(self, n, L, vocab, seed=0):
        self.total_rows, self.seq_len, self.vocab, self.seed = n, L, vocab, seed

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed + i)
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=g)
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[self.seq_len // 4:] = True
        return {"input_ids": ids, "loss_mask": mask}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--model", default=None, help="a model path or GGUF file (pretrained weights) instead of --shape")
    ap.add_argument("--vocab", type=int, default=None, help="token ids of the synthetic rows (default: the shape's)")
    ap.add_argument("--recipe", default="qwen3-8b", help="recipe whose settings the run starts from (e.g. qwen3-72b)")
    ap.add_argument("--heads", default="orthrus", choices=["orthrus", "medusa"])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--anchors", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--micro", type=int, nargs="+", default=[1], help="micro batch per GPU; several: one run each")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--no-grad-ckpt", action="store_true")
    ap.add_argument("--compile-norm-rope", action="store_true",
                    help="train.compile_norm_rope=true: the training RMSNorm and RoPE compiled (CUDA only)")
    ap.add_argument("--loss-backend", default="auto")
    ap.add_argument("--attn-backend", default="auto")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (the numbers mean nothing there)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="profile that many steps after the warm-up (torch.profiler): the row gets the step's device "
                         "busy share and its top operators, and --profile-out DIR gets the table per micro batch")
    ap.add_argument("--profile-out", default=None, help="folder for train_profile_micro<M>.txt (with --profile-steps)")
    ap.add_argument("--trace-out", default=None,
                    help="folder for train_trace_micro<M>.json.gz, the profiled steps' timeline (chrome://tracing, "
                         "Perfetto): where the device waits for the host (with --profile-steps)")
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ["ORTHRUS_NO_PROGRESS"] = "1"

    from orthrus_train.launch.dist_env import resolve_dist_env

    dist = resolve_dist_env()
    rows = [bench_one(a, micro, dist) for micro in a.micro]
    if dist.rank != 0:
        return
    out = rows[0] if len(rows) == 1 else rows
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


def bench_one(a, micro: int, dist) -> dict | None:
    from orthrus_train.config.loader import compose
    from orthrus_train.run_dir import RunDir
    from orthrus_train.train.engine import run_train

    world = dist.world_size
    G = micro * a.accum * world
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model = ([f"model.path={a.model}", "model.init=pretrained"] if a.model
             else ["model.init=random", f"model.shape={a.shape}"])
    ov = model + [f"heads.type={a.heads}", f"heads.block_size={a.block}",
          f"heads.attn_backend={a.attn_backend}", f"train.seq_len={a.seq_len}", f"train.anchors_per_row={a.anchors}",
          f"train.micro_batch={micro}", f"train.global_batch={G}", f"train.max_steps={a.warmup + a.steps}",
          f"train.save_every={10 ** 6}", "train.wandb.mode=disabled", f"deepspeed.stage={a.zero}",
          f"train.grad_checkpointing={not a.no_grad_ckpt}", f"train.loss_backend={a.loss_backend}",
          f"train.compile_norm_rope={a.compile_norm_rope}",
          f"run_dir={tmp}", "resume=never", f"device={a.device}", "train.log_every=1"]
    cfg = compose(a.recipe, ov)
    cfg.train.save_every = 10 ** 9
    from orthrus_train.model.backbones import qwen3_shape
    vocab = a.vocab or (qwen3_shape(a.shape).vocab_size if a.shape.startswith("qwen3") else 151936)
    data = SyntheticRows(G * (a.warmup + a.steps), a.seq_len, min(vocab, 151669))
    recs = []
    import orthrus_train.train.logging as lg
    orig = lg.MetricsLogger.log

    prof = _Profiler(a.profile_steps, a.warmup) if a.profile_steps and dist.rank == 0 else None

    def keep(self, rec):
        recs.append(rec)
        orig(self, rec)
        if prof is not None:
            prof.after_step(len(recs), rec)
    lg.MetricsLogger.log = keep
    t0 = time.time()
    try:
        run_train(cfg, RunDir(tmp), dist, data=data)
    except SystemExit:
        pass
    finally:
        lg.MetricsLogger.log = orig
        if prof is not None:
            prof.stop()
    if dist.rank != 0:
        return None
    steady = recs[a.warmup:]
    row = {
        "recipe": a.recipe, "shape": a.model or a.shape, "heads": a.heads, "world": world, "zero": a.zero,
        "seq_len": a.seq_len, "anchors": a.anchors,
        "block": a.block, "micro": micro, "accum": a.accum, "grad_ckpt": not a.no_grad_ckpt,
        "compile_norm_rope": a.compile_norm_rope,
        "loss_backend": a.loss_backend, "steps_measured": len(steady),
        "step_time_s": sum(r["step_time_s"] for r in steady) / max(1, len(steady)),
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / max(1, len(steady)),
        "tokens_per_s_per_gpu": sum(r["tokens_per_s"] for r in steady) / max(1, len(steady)) / world,
        "mfu": (sum(r["mfu"] for r in steady) / len(steady)) if steady and steady[0]["mfu"] is not None else None,
        "peak_mem_gb_rank0": max((r["peak_mem_gb"] or 0) for r in recs) if recs else None,
        "loss_first": recs[0]["loss"] if recs else None, "loss_last": recs[-1]["loss"] if recs else None,
        "wall_s": time.time() - t0, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    if prof is not None:
        row["profile"] = prof.summary()
        if a.profile_out:
            Path(a.profile_out).mkdir(parents=True, exist_ok=True)
            (Path(a.profile_out) / f"train_profile_micro{micro}.txt").write_text(prof.table)
        if a.trace_out:
            Path(a.trace_out).mkdir(parents=True, exist_ok=True)
            row["profile"]["trace"] = prof.export_trace(Path(a.trace_out) / f"train_trace_micro{micro}.json.gz")
    return row


class _Profiler:
    """torch.profiler over `n` training steps after `warmup`: how much of the steps' wall time the device was busy
    (a launch- or sync-bound step leaves it idle) and which operators took the device time."""

    def __init__(self, n: int, warmup: int, top: int = 25):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.on_device = torch.cuda.is_available()
        self.n, self.warmup, self.top = n, warmup, top
        self.prof = profile(activities=acts)
        self.running = False
        self.wall_s = 0.0
        self.table = ""
        self.rows: list[dict] = []
        if warmup == 0:
            self._start()

    def _start(self):
        self.prof.start()
        self.running = True

    def after_step(self, done: int, rec: dict) -> None:
        """Called after step number `done` (1-based) was logged, with its metrics record."""
        if self.running:
            self.wall_s += rec["step_time_s"]
            if done >= self.warmup + self.n:
                self.stop()
        elif done == self.warmup:
            self._start()

    def stop(self) -> None:
        if not self.running:
            return
        if self.on_device:
            torch.cuda.synchronize()
        self.prof.stop()
        self.running = False
        from torch.autograd import DeviceType

        ev = self.prof.key_averages()
        key = "self_device_time_total" if self.on_device else "self_cpu_time_total"

        def self_us(e):
            if not self.on_device:
                return e.self_cpu_time_total
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        # on a GPU: the kernels themselves (an operator's row repeats the time of the kernels it launched), less the
        # profiler's own overhead records, which come as device rows too ("Command Buffer Full": the profiler's
        # buffer; "Lazy Function Loading": a module loaded on first use, e.g. a kernel first compiled in these steps)
        mine = [e for e in ev if e.device_type == DeviceType.CUDA] if self.on_device else list(ev)
        overhead = [e for e in mine if e.key in PROFILER_OVERHEAD]
        mine = [e for e in mine if e.key not in PROFILER_OVERHEAD]
        self.overhead = {e.key: {"calls": e.count, "ms": self_us(e) / 1e3} for e in overhead}
        ranked = sorted(mine, key=self_us, reverse=True)
        self.busy_us = sum(self_us(e) for e in mine) if self.on_device else None
        self.rows = [{"name": e.key, "calls": e.count, "self_ms": self_us(e) / 1e3} for e in ranked[: self.top]]
        self.table = ev.table(sort_by=key, row_limit=self.top * 2)

    def export_trace(self, path: Path) -> str:
        """The profiled steps' timeline as gzipped Chrome trace JSON (the profiler gzips a `.gz` path); returns it."""
        self.prof.export_chrome_trace(str(path))
        return str(path)

    def summary(self) -> dict:
        out = {"steps": self.n, "wall_s": self.wall_s, "top": self.rows,
               "time_kind": "device (kernels)" if self.on_device else "host (CPU: no device timeline)"}
        if self.on_device and self.wall_s > 0:
            out["device_busy_s"] = self.busy_us / 1e6
            out["device_busy_share"] = self.busy_us / 1e6 / self.wall_s
            out["profiler_overhead"] = self.overhead  # excluded from the busy time
        return out


# CUPTI overhead records that the profiler lists among the device rows; not kernel time
PROFILER_OVERHEAD = frozenset({"Command Buffer Full", "Lazy Function Loading", "CUPTI Buffer Flush",
                               "Activity Buffer Request", "CUPTI Instrumentation"})


if __name__ == "__main__":
    main()
