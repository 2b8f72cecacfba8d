"""The training stage on DeepSpeed: ZeRO 1/2/3, a frozen backbone, exact resume.

Determinism by construction: the rows of optimizer step s are a pure function of (seed, s); each
micro-batch k of a step goes to rank k % world, and each row's anchors come from a generator seeded
by (seed, epoch, row position). So a resumed run recomputes exactly the losses of an uninterrupted
one, and 2 processes compute the same micro-batches as 1 process with the same global batch.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..losses import chunked_distill
from ..run_dir import RunDir, atomic_write_json
from . import checkpoint as ckpt
from .flops import measured_peak_flops, row_flops


class TrainingDiverged(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Plan:
    total_rows: int
    global_batch: int
    micro_batch: int
    world: int
    steps_per_epoch: int
    total_steps: int

    @property
    def micro_per_step(self) -> int:
        return self.global_batch // self.micro_batch

    @property
    def accum(self) -> int:
        return self.micro_per_step // self.world


def make_plan(total_rows: int, t, world: int) -> Plan:
    from ..config.schema import ConfigError

    G, m = t.global_batch, t.micro_batch
    if (G // m) % world:
        raise ConfigError(f"train.global_batch={G} / train.micro_batch={m} = {G // m} micro-batches per step cannot be "
                         f"split evenly over {world} processes; choose a global batch that is a multiple of "
                         f"micro_batch x world_size = {m * world}")
    spe = total_rows // G
    if spe == 0:
        raise ConfigError(f"the data stage wrote {total_rows} rows but one optimizer step needs train.global_batch={G}; "
                         "add prompts (data.num_samples / more sources) or lower train.global_batch")
    total = max(1, math.ceil(t.epochs * spe))
    if t.max_steps > 0:
        total = min(total, t.max_steps)
    return Plan(total_rows, G, m, world, spe, total)


def step_rows(plan: Plan, step: int, seed: int) -> tuple[int, torch.Tensor]:
    """(epoch, global row ids of this optimizer step in micro-batch order)."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    perm = _epoch_perm(plan.total_rows, seed, epoch)
    return epoch, perm[within * plan.global_batch:(within + 1) * plan.global_batch]


@functools.lru_cache(maxsize=2)
def _epoch_perm(total_rows: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(total_rows, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


@dataclass
class Blocks:
    """A micro-batch's anchor blocks and supervision map, built on the host before the step (so that the
    forward never reads the device to size them) and moved to the device with the rows."""
    anchors: torch.Tensor  # (B, N)
    valid: torch.Tensor  # (B, N) bool
    sup: "Supervision"
    n_blocks: int
    offset: torch.Tensor  # sup.offset on the host, for the agreement metrics


def make_blocks(loss_mask: torch.Tensor, seeds, n_anchors: int, K: int, segment_ids=None) -> Blocks:
    """Anchors of each row from its own seed (`sample_anchors_seeded`) and their supervision map."""
    from ..model.anchors import sample_anchors_seeded, supervision

    anchors, valid = sample_anchors_seeded(loss_mask, n_anchors, seeds)
    sup = supervision(anchors, valid, loss_mask, K, segment_ids)
    return Blocks(anchors, valid, sup, int(valid.sum()), sup.offset)


def micro_batch(data, rows, device, document_mask: bool, blocks: tuple | None = None) -> dict:
    """The rows `rows` of `data` stacked as DistillStep takes them. Packed rows also carry segment_ids and
    position_ids, so that each document attends only to itself at its own positions (train.document_mask);
    with document_mask=false, or rows without them (synthetic benchmark rows), a row is one causal sequence.
    blocks=(seeds, n_anchors, K): also sample each row's anchors on the host and build the supervision map
    there (key "blocks", a `Blocks` on `device`), so that the step has no host read of the device."""
    batch = [data[int(r)] for r in rows]
    keys = ["input_ids", "loss_mask"]
    if document_mask and "segment_ids" in batch[0]:
        keys += ["segment_ids", "position_ids"]
    # to_device: pinned and non-blocking on CUDA, so queued behind the running step (a copy from pageable memory
    # would first synchronise the stream, i.e. wait for the step, which loading ahead is there to avoid)
    from ..decode.engine import to_device

    dev = torch.device(device)
    host = {key: torch.stack([b[key] for b in batch]) for key in keys}
    out = {key: to_device(x, dev) for key, x in host.items()}
    if blocks is not None:
        seeds, n_anchors, K = blocks
        b = make_blocks(host["loss_mask"], seeds, n_anchors, K, host.get("segment_ids"))
        out["blocks"] = Blocks(to_device(b.anchors, dev), to_device(b.valid, dev),
                               b.sup.apply(lambda x: to_device(x, dev)), b.n_blocks, b.offset)
    return out


def row_seed(seed: int, epoch: int, row: int) -> int:
    return (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + row * 0xC2B2AE3D) % (2 ** 63 - 1)


def offset_weights(offset: torch.Tensor, decay: float) -> torch.Tensor:
    """train.offset_decay: the loss weight of each supervised token, exp(-decay * its block offset)."""
    return torch.exp(-decay * offset)


VAL_EPOCH = -1  # val row r's anchors come from row_seed(seed, VAL_EPOCH, r): the same blocks at every evaluation


def agreement_counts(offs, s_all, t_all, K: int) -> torch.Tensor:
    """Per block offset (0..K-2): student-teacher argmax agreements, then supervised tokens, as one float64
    tensor of 2(K-1) (the sums that `agreement_rates` turns into rates, all-reduced beside the loss sums)."""
    offset, s_arg, t_arg = torch.cat(offs).cpu(), torch.cat(s_all).cpu(), torch.cat(t_all).cpu()
    return torch.cat([torch.bincount(offset, weights=(s_arg == t_arg).double(), minlength=K - 1),
                      torch.bincount(offset, minlength=K - 1).double()])


def sum_over_ranks(red: torch.Tensor, device, world: int) -> torch.Tensor:
    """`red` (on the host) summed over the processes (through `device`: NCCL reduces device tensors)."""
    if world > 1:
        red = red.to(device)
        torch.distributed.all_reduce(red)
        red = red.cpu()
    return red


def agreement_rates(hits: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-offset agreement (NaN where an offset has no token) and the expected acceptance it implies."""
    rates = torch.where(counts > 0, hits / counts.clamp(min=1), torch.full_like(counts, float("nan")))
    return rates, 1.0 + float(torch.cumprod(torch.nan_to_num(rates, nan=0.0), 0).sum())


def val_reader(run: RunDir, t, rank: int, world: int, log):
    """(RUN/data/val as this rank's reader, rows per rank) for train.val_every, or None when validation is off;
    one line (rank 0) says why when it was asked for but has no rows."""
    if t.val_every == 0:
        return None
    from ..data.pack import PackedDataset

    path = run.data / "val"
    why = None
    if not (path / "index.json").exists():
        why = f"{path} not found (no held-out prompt: data.holdout_count, or data made before val/ existed)"
    else:
        val = PackedDataset(path, rank, world)
        per_rank = min(len(val), (t.val_rows if t.val_rows is not None else val.total_rows) // world)
        if val.seq_len != t.seq_len:
            why = f"{path} rows are {val.seq_len} tokens, train.seq_len={t.seq_len}"
        elif per_rank == 0:
            why = f"{path} has {val.total_rows} rows for {world} processes (train.val_rows={t.val_rows})"
        else:
            return val, per_rank
    if rank == 0:
        log(f"[train] validation off: {why}; training goes on")
    return None


def val_metrics(engine, val, per_rank: int, t, K: int, device, rank: int, world: int) -> dict:
    """The training loss, per-offset agreement and expected acceptance over the first per_rank x world rows of
    data/val (rank r: global rows r, r + world, ...), with no gradient and every module in eval mode. Each row's
    anchors come from its global row id with a fixed seed, so equal heads give equal values at any step and on
    any number of processes. Every rank runs the same number of forwards (ZeRO-3 gathers in each)."""
    modes = {m: m.training for m in engine.modules()}
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # weighted loss, weight, supervised tokens, rows
    offs, s_all, t_all = [], [], []
    try:
        with torch.no_grad():
            for lo in range(0, per_rank, t.micro_batch):
                local = torch.arange(lo, min(lo + t.micro_batch, per_rank))  # this rank's rows of data/val
                seeds = [row_seed(t.seed, VAL_EPOCH, rank + int(i) * world) for i in local]
                mb = micro_batch(val, local, device, t.document_mask, blocks=(seeds, t.anchors_per_row, K))
                loss, st = engine(mb["input_ids"], mb["loss_mask"], mb["blocks"], mb.get("segment_ids"),
                                  mb.get("position_ids"))
                # the step's loss is a (weighted) mean over its supervised tokens: weigh it back into a sum
                w = (float(offset_weights(st["offset"].double(), t.offset_decay).sum()) if t.offset_decay > 0
                     else float(st["n_sup"]))
                sums += torch.tensor([loss.detach().double().item() * w, w, st["n_sup"], len(local)],
                                     dtype=torch.float64)
                offs.append(st["offset"]), s_all.append(st["s_arg"]), t_all.append(st["t_arg"])
    finally:
        for m, training in modes.items():
            m.train(training)
    red = sum_over_ranks(torch.cat([sums, agreement_counts(offs, s_all, t_all, K)]), device, world)
    rates, expected = agreement_rates(red[4:4 + K - 1], red[4 + K - 1:])
    return {"val_loss": float(red[0] / red[1]) if red[1] > 0 else float("nan"),
            "val_agreement": [round(float(r), 4) for r in rates.tolist()], "val_expected_accept": expected,
            "val_rows": int(red[3]), "val_supervised_tokens": int(red[2])}


def lr_lambda(total_steps: int, warmup_ratio: float, min_ratio: float):
    warm = max(1, int(round(warmup_ratio * total_steps)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


# ------------------------------------------------------------------------------------------ step
class DistillStep(nn.Module):
    """What DeepSpeed wraps: one micro-batch -> scalar loss (mean over its supervised tokens)."""

    def __init__(self, model, loss: str, backend: str, chunk: int, temperature: float, n_anchors: int,
                 offset_decay: float = 0.0):
        super().__init__()
        self.model = model
        self.loss, self.backend, self.chunk = loss, backend, chunk
        self.temperature, self.n_anchors = temperature, n_anchors
        self.offset_decay = float(offset_decay)  # train.offset_decay: weight exp(-decay * offset) per token

    def forward(self, input_ids, loss_mask, blocks, segment_ids=None, position_ids=None):
        """blocks: the micro-batch's `Blocks` (built on the host by `micro_batch`), or the rows' anchor seeds
        (a list of ints: the same blocks, built here on the rows' device)."""
        if not isinstance(blocks, Blocks):
            blocks = make_blocks(loss_mask, blocks, self.n_anchors, self.model.block_size, segment_ids)
        out = self.model.train_outputs(input_ids, loss_mask, self.n_anchors, anchors=(blocks.anchors, blocks.valid),
                                       segment_ids=segment_ids, position_ids=position_ids, sup=blocks.sup)
        weight = self.model.lm_weight()
        with _gathered(weight):
            per_tok, s_arg, t_arg = self._loss(out.hs, out.ht, weight)
        n = per_tok.numel()
        if self.offset_decay > 0 and n:
            w = offset_weights(out.sup.offset.to(per_tok.device, torch.float32), self.offset_decay)
            loss = (per_tok * w).sum() / w.sum()  # weighted mean over the supervised tokens
        else:
            loss = per_tok.sum() / max(n, 1)
        if n == 0:
            loss = out.hs.sum() * 0.0
        stats = {"offset": blocks.offset, "s_arg": s_arg, "t_arg": t_arg, "n_sup": n,
                 "n_blocks": blocks.n_blocks}  # host values only: a device read here stalls the step
        return loss, stats

    def _loss(self, hs, ht, weight):
        if self.backend == "triton":
            from orthrus_kernels import fused_linear_ce, fused_linear_kl
            if self.loss == "kl":
                return fused_linear_kl(hs, ht, weight, temperature=self.temperature, return_argmax=True)
            from ..losses import teacher_argmax
            t_arg = teacher_argmax(ht, weight, self.chunk)
            per, s_arg = fused_linear_ce(hs, weight, t_arg, return_argmax=True)
            return per, s_arg, t_arg
        return chunked_distill(hs, ht, weight, kind=self.loss, chunk_size=self.chunk, temperature=self.temperature)


def _gathered(param):
    """Full view of a ZeRO-3 partitioned parameter for the duration of a block. A parameter that is
    already available (persistent, or in use by a module, e.g. the embedding tied to lm_head) is left
    alone: releasing it here would pull it from under that module."""
    import contextlib

    if hasattr(param, "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if param.ds_status != ZeroParamStatus.AVAILABLE:
            import deepspeed
            return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def consolidated_heads(model) -> dict[str, torch.Tensor]:
    """The trained head tensors as full CPU tensors (gathers ZeRO-3 partitions one at a time)."""
    out = {}
    for name, t in model.head_state_dict().items():
        with _gathered(t):
            out[name] = t.detach().to("cpu").clone().contiguous()
    return out


# ------------------------------------------------------------------------------------------ run
def ds_config(cfg, plan: Plan) -> dict:
    t, d = cfg.train, cfg.deepspeed
    zero = {"stage": d.stage, "overlap_comm": d.overlap_comm, "reduce_bucket_size": d.reduce_bucket_size,
            "contiguous_gradients": True}
    if d.stage == 3:
        zero.update(stage3_prefetch_bucket_size=d.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=d.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    conf = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    conf.update(d.extra)
    return conf


def name_deepspeed_accelerator(device: torch.device) -> None:
    """Tell DeepSpeed a CPU run is one before it is first imported: its own detection reaches the same answer but
    warns about an undetected GPU (in the middle of a re-run's "skipped" lines, where reading a finished
    checkpoint back is what first imports it)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(device: torch.device, dist):
    """Every launch path (torchrun, deepspeed, srun) ends here with the same env:// variables."""
    import dataclasses

    from ..launch.dist_env import export_torch_env

    if dist.world_size == 1 and "MASTER_PORT" not in os.environ:
        # a lone process needs a rendezvous port too; take a free one rather than the fixed default,
        # which another run on the same machine may hold
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dist = dataclasses.replace(dist, master_port=s.getsockname()[1], master_addr="127.0.0.1")
    export_torch_env(dist)
    name_deepspeed_accelerator(device)
    import deepspeed

    if not torch.distributed.is_initialized():
        from datetime import timedelta
        # long timeout: between stages the other ranks wait for rank 0 (packing, eval, export)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False, timeout=timedelta(hours=12))
    return deepspeed


# Seconds to pause after every logged step (tests only: makes kill -9 tests deterministic on fast machines).
_STEP_SLEEP = float(os.environ.get("ORTHRUS_DEBUG_STEP_SLEEP", "0") or 0)


def run_train(cfg, run: RunDir, dist, model=None, data=None, log=print) -> dict:
    """Train the heads of `cfg` on RUN/data/train (or `data`: any object with total_rows, seq_len and
    __getitem__ returning input_ids/loss_mask rows, e.g. synthetic rows for benchmarks)."""
    from ..model.layers import set_train_compile

    set_train_compile(cfg.train.compile_norm_rope)  # train.compile_norm_rope (on CUDA devices only)
    try:
        return _run_train(cfg, run, dist, model, data, log)
    finally:  # later stages in this process (eval) run the eager functions
        set_train_compile(False)


def _run_train(cfg, run: RunDir, dist, model, data, log) -> dict:
    from ..data.pack import PackedDataset
    from ..launch.preemption import any_rank, shared_handler
    from ..model.factory import build_backbone, build_model, resolve_device, tokenizer_for
    from .logging import MetricsLogger

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(dist.local_rank)
        device = torch.device("cuda", dist.local_rank)
    deepspeed = init_distributed(device, dist)
    rank, world = dist.rank, dist.world_size
    t = cfg.train
    torch.manual_seed(t.seed)

    data = data if data is not None else PackedDataset(run.data / "train")
    if data.seq_len != t.seq_len:
        from ..config.schema import ConfigError
        raise ConfigError(f"packed rows are {data.seq_len} tokens but train.seq_len={t.seq_len}; rerun stage=data "
                         "or set train.seq_len to match")
    plan = make_plan(data.total_rows, t, world)
    dsc = ds_config(cfg, plan)
    zero3_ctx = None
    if model is None:
        tok = tokenizer_for(cfg, run.tokenizer)
        if cfg.deepspeed.stage == 3:
            # keep alive while building: transformers then creates (from_config) or loads
            # (from_pretrained) the backbone already partitioned across the ranks (zero.Init)
            from transformers.integrations import HfDeepSpeedConfig
            zero3_ctx = HfDeepSpeedConfig(dsc)  # noqa: F841 - referenced weakly by transformers; must stay alive
        model = build_model(cfg, build_backbone(cfg, device), tok)
    backend = t.loss_backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    step_mod = DistillStep(model, t.loss, backend, t.loss_chunk, t.temperature, t.anchors_per_row,
                           t.offset_decay)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(plan.total_steps, t.warmup_ratio, t.min_lr_ratio))
    if cfg.heads.init_from:  # before DeepSpeed copies the parameters; a checkpoint to resume wins
        from ..model.warm_start import warm_start
        warm_start(model, cfg, run, log=log if rank == 0 else (lambda *_: None))
    engine, _, _, _ = deepspeed.initialize(model=step_mod, optimizer=opt, lr_scheduler=sched, config=dsc)

    start, folder = 0, None
    if cfg.resume != "never":
        if cfg.resume == "auto":
            folder = ckpt.find_resumable(run.checkpoints, rank, log=log if rank == 0 else (lambda *_: None))
        else:
            from pathlib import Path
            folder = Path(cfg.resume).expanduser()
            bad = ckpt.problems(folder, rank)
            if bad:
                from ..config.schema import ConfigError
                raise ConfigError(f"resume={cfg.resume} is not a loadable checkpoint: " + "; ".join(bad))
        if folder is not None:
            state = ckpt.load(engine, folder, rank)
            start = state["step"]
            if rank == 0:
                log(f"[train] resumed from {folder} at step {start}/{plan.total_steps}")
    n_trainable = sum(p.numel() for p in params) if not hasattr(params[0], "ds_numel") else sum(p.ds_numel for p in params)
    n_total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    logger = MetricsLogger(run, cfg, rank, plan, n_trainable, n_total, start_step=start)
    preempt = shared_handler(cfg.launcher.requeue)
    peak = measured_peak_flops(device)
    K = model.block_size
    mcfg = model.config
    last_ckpt = folder  # newest good checkpoint of this run so far (the NaN diagnostic names it)
    summary = {}
    mine = [k for k in range(plan.micro_per_step) if k % world == rank]  # this rank's micro-batches of a step
    val = val_reader(run, t, rank, world, log)
    val_every = t.save_every if t.val_every is None else t.val_every

    def load(step_i: int, k: int):
        """Micro-batch k of step step_i on the device, with its anchors and supervision map built on the host."""
        epoch_i, rows_i = step_rows(plan, step_i, t.seed)
        ids = rows_i[k * plan.micro_batch:(k + 1) * plan.micro_batch]
        seeds = [row_seed(t.seed, epoch_i, int(r)) for r in ids]
        return ids, micro_batch(data, ids, device, t.document_mask, blocks=(seeds, t.anchors_per_row, K))

    def following(step_i: int, j: int):
        """The (step, micro-batch) this rank runs after its j-th micro-batch of step step_i (None: the last)."""
        if j + 1 < len(mine):
            return step_i, mine[j + 1]
        return (step_i + 1, mine[0]) if step_i + 1 < plan.total_steps else None

    ahead: dict = {}  # the next micro-batch, loaded while the device runs the current one
    step = start
    for step in range(start, plan.total_steps):
        t0 = time.perf_counter()
        epoch, _ = step_rows(plan, step, t.seed)
        agg = {"n_sup": 0, "n_blocks": 0, "loss_mean_sum": 0.0, "micro": 0}
        offs, s_all, t_all = [], [], []
        flops = 0.0
        for j, k in enumerate(mine):
            ids_k, mb = ahead.pop((step, k), None) or load(step, k)
            loss, st = engine(mb["input_ids"], mb["loss_mask"], mb["blocks"], mb.get("segment_ids"),
                              mb.get("position_ids"))
            engine.backward(loss)  # queued before the host reads the loss: the backward's kernels launch meanwhile
            nxt = following(step, j)
            if nxt is not None:  # the next micro-batch's host work (rows, anchors, supervision, copies) overlaps it
                ahead[nxt] = load(*nxt)
            loss_value = loss.detach().item()
            if any_rank(not math.isfinite(loss_value)):  # before step(): a non-finite gradient never reaches the weights
                raise TrainingDiverged(
                    f"non-finite loss at step {step} (micro-batch {k}, rows {ids_k.tolist()}, lr "
                    f"{sched.get_last_lr()[0]:.3g}); the last good checkpoint is kept: "
                    f"{last_ckpt or 'none yet'}. Lower train.lr, check the data rows, or use train.precision=fp32.")
            engine.step()
            agg["loss_mean_sum"] += loss_value
            agg["micro"] += 1
            agg["n_sup"] += st["n_sup"]
            agg["n_blocks"] += st["n_blocks"]
            offs.append(st["offset"]), s_all.append(st["s_arg"]), t_all.append(st["t_arg"])
            flops += row_flops(mcfg, t.seq_len, st["n_blocks"] / len(ids_k), K, st["n_sup"] / len(ids_k),
                               t.grad_checkpointing, medusa=model.head_type == "medusa") * len(ids_k)
        red = sum_over_ranks(torch.cat([torch.tensor([agg["loss_mean_sum"], agg["micro"], agg["n_sup"],
                                                       agg["n_blocks"], flops], dtype=torch.float64),
                                         agreement_counts(offs, s_all, t_all, K)]), device, world)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        loss_mean = float(red[0] / red[1])
        rates, expected = agreement_rates(red[5:5 + K - 1], red[5 + K - 1:])
        tokens = plan.global_batch * t.seq_len
        record = {
            "step": step + 1, "epoch": epoch, "loss": loss_mean, "lr": sched.get_last_lr()[0],
            "grad_norm": _grad_norm(engine), "agreement": [round(float(r), 4) for r in rates.tolist()],
            "expected_accept": expected, "supervised_tokens": int(red[2]), "blocks": int(red[3]),
            "tokens_per_s": tokens / dt, "step_time_s": dt,
            "mfu": (float(red[4]) / dt / (peak * world)) if peak else None,
            "peak_mem_gb": (torch.cuda.max_memory_allocated(device) / 2 ** 30) if device.type == "cuda" else None,
        }
        last = step + 1 == plan.total_steps
        if val is not None and (last or (step + 1) % val_every == 0):  # in the record its checkpoint keeps
            t_val = time.perf_counter()
            record.update(val_metrics(engine, *val, t, K, device, rank, world), val_time_s=time.perf_counter() - t_val)
        summary = record
        stop = any_rank(preempt.should_checkpoint_and_exit)
        if stop or last or (step + 1) % t.save_every == 0:  # checkpoint first: a signal may end logging
            last_ckpt = _save(engine, model, run, step + 1, epoch, plan, rank, t.keep_checkpoints, record)
        logger.log(record)
        if _STEP_SLEEP:  # testing hook: lets a test kill the process between two known steps
            time.sleep(_STEP_SLEEP)
        if stop:
            if rank == 0:
                log(f"[train] signal received: checkpoint {last_ckpt.name} written; stopping for requeue")
            preempt.requeue()
            logger.close()
            sys.exit(preempt.exit_code or 143)
    logger.close(final=summary, checkpoint=str(last_ckpt) if last_ckpt else None)
    if rank == 0:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in frozen)
        atomic_write_json(run.train_summary, {"plan": plan.__dict__, "final": summary,
                                              "checkpoint": str(last_ckpt) if last_ckpt else None,
                                              "trainable_params": n_trainable, "total_params": n_total,
                                              "zero_stage": cfg.deepspeed.stage, "world_size": world,
                                              # under ZeRO-3 each rank holds only its partition of the frozen backbone
                                              "frozen_params_total": sum(getattr(p, "ds_numel", p.numel()) for p in frozen),
                                              "frozen_params_on_rank0": local})
    return summary


def _grad_norm(engine):
    try:
        g = engine.get_global_grad_norm()
        return None if g is None else float(g)
    except Exception:  # noqa: BLE001 - optional diagnostic
        return None


def _save(engine, model, run: RunDir, step: int, epoch: int, plan: Plan, rank: int, keep: int, record: dict):
    from safetensors.torch import save_file

    from ..model.warm_start import backbone_meta

    state = {"step": step, "epoch": epoch, "rows_consumed": step * plan.global_batch, "plan": plan.__dict__,
             "head_type": model.head_type, "block_size": model.block_size, "mask_token_id": model.mask_token_id,
             "metrics": record}
    heads = consolidated_heads(model)

    class _Engine:  # write heads.safetensors into the temp folder before the manifest is made
        def save_checkpoint(self, root, tag, **kw):
            engine.save_checkpoint(root, tag=tag, **kw)
            if rank == 0:
                # what the heads were trained for: heads.init_from checks a checkpoint against its run with it
                save_file(heads, os.path.join(root, tag, "heads.safetensors"),
                          metadata={"head_type": model.head_type, "block_size": str(model.block_size),
                                    "mask_token_id": str(model.mask_token_id),
                                    "backbone": json.dumps(backbone_meta(model.config))})
    return ckpt.save(_Engine(), run.checkpoints, step, state, rank, keep)


def load_heads(model, folder) -> None:
    """Load heads.safetensors of a checkpoint folder into a freshly built model (eval/export)."""
    from safetensors.torch import load_file

    f = folder / "heads.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: {folder} is not a complete training checkpoint")
    heads = load_file(str(f))
    expected = model.head_state_dict()
    missing, extra = sorted(set(expected) - set(heads)), sorted(set(heads) - set(expected))
    if missing or extra:
        raise ValueError(f"{f} does not match this model (heads.type/block_size/backbone?): "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, v in heads.items():
            if expected[k].shape != v.shape:
                raise ValueError(f"{f}: {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")
            expected[k].copy_(v.to(expected[k].dtype))
