"""The structured configuration: every key a recipe or the command line may set, with its type.

Hydra composes `recipes/NAME.yaml` with the groups in `configs/`; the result is merged into
`RootConfig`, so an unknown key, a wrong type or a missing required value fails at start with the
key named. Semantic checks that span keys live in `validate()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..data.config import DataConfig
from ..eval.config import EvalConfig
from ..launch.slurm import SlurmConfig


@dataclass
class TinyShape:
    """Backbone shape for model.init=random with model.shape=tiny (the CPU demo and tests)."""
    family: str = "qwen3"
    vocab_size: int = 320
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    initializer_range: float = 0.2  # sharp random logits: the demo backbone writes low-entropy text


@dataclass
class ModelConfig:
    # Local Hugging Face folder, a .gguf file, or a Hub id. Required unless init=random.
    path: Optional[str] = None
    revision: Optional[str] = None
    # pretrained: load `path`. random: build `shape` with random weights (memory/throughput planning).
    init: str = "pretrained"
    # For init=random: tiny (see `tiny`) or a Qwen3 shape name (qwen3-0.6b ... qwen3-72b, qwen3-30b-a3b).
    shape: Optional[str] = None
    tiny: TinyShape = field(default_factory=TinyShape)
    # Tokenizer folder/id when it differs from `path`; for init=random the project's byte tokenizer.
    tokenizer: Optional[str] = None
    dtype: str = "bfloat16"  # bfloat16 | float32 (CPU demo)
    # Default: first id after the real vocabulary (Qwen3: 151669) or one extra embedding row.
    mask_token_id: Optional[int] = None
    force_mask_token_id: bool = False
    # Base model license, for the model card.
    license: Optional[str] = None


@dataclass
class HeadsConfig:
    type: str = "orthrus"  # orthrus | medusa (baseline)
    block_size: int = 32  # K: one draft pass proposes K-1 tokens
    # Which twins train (others stay copies of the AR weights).
    trainable: list[str] = field(default_factory=lambda: ["q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff",
                                                          "q_norm_diff", "k_norm_diff"])
    attn_backend: str = "auto"  # auto (flex on CUDA, sdpa on CPU) | sdpa | flex
    # Warm start: an Orthrus export (ours, full or heads-only, or the official layout; folder or Hub id),
    # a run folder or one of its checkpoints (Orthrus twins or Medusa heads) whose heads initialise a
    # fresh run (model/warm_start.py). A checkpoint to resume wins over it.
    init_from: Optional[str] = None


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (default: no account needed) | online | disabled
    project: str = "orthrus-train"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class TrainConfig:
    seq_len: int = 2048
    anchors_per_row: int = 256
    micro_batch: int = 1  # rows per GPU per forward
    global_batch: int = 128  # rows per optimizer step (micro_batch x grad accumulation x world size)
    epochs: float = 2.0
    max_steps: int = -1  # > 0 caps the optimizer steps
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    loss: str = "kl"  # kl (forward KL to the teacher) | ce (hard cross-entropy to the teacher's argmax)
    loss_backend: str = "auto"  # auto (triton on CUDA) | torch | triton
    loss_chunk: int = 2048  # tokens per chunk of the torch loss path
    temperature: float = 1.0
    # Per-offset loss weights: the token k+1 places after the anchor (block offset k = 0..K-2) weighs
    # exp(-offset_decay * k) in the loss, normalised over the micro-batch's supervised tokens (a weighted
    # mean). 0 = every supervised token alike (the paper's mean per token). Acceptance stops at the first
    # miss, so early offsets decide most of it; try 0.1-0.3.
    offset_decay: float = 0.0
    grad_checkpointing: bool = True
    # CUDA only: the training passes' RMSNorm and RoPE as torch.compile'd (fused) functions, forward and
    # backward (model/layers.py, set_train_compile); some seconds of compilation at the first step (a function
    # that fails to compile runs eagerly, with one warning). Off: eager. On by default since session 15: SmolLM2
    # on one H200 at micro batch 128, 218.9K against 137.4K tokens/s (bench, same commit, same losses) and 166.6K
    # in a real 800-step run against 119.6K uncompiled (docs/benchmarks.md).
    compile_norm_rope: bool = True
    # Packed rows: each document sees only itself (AR pass and diffusion blocks), at positions restarting
    # at 0, as it will when served alone. false: plain causal attention across the packed row.
    document_mask: bool = True
    precision: str = "bf16"  # bf16 | fp32
    seed: int = 0
    save_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2
    # optimizer steps between the printed metric lines and the wandb points (also every validated and the last
    # step); metrics.jsonl keeps every step
    log_every: int = 10
    # Validation on RUN/data/val (the held-out prompts' rows): the training loss, per-offset agreement and
    # expected acceptance over those rows, with no gradient and anchors drawn from fixed seeds (comparable
    # across steps), logged as val_* fields of that step's metrics.jsonl record. Every val_every optimizer
    # steps and at the last step; None: at every checkpoint (train.save_every); 0: off. Without data/val
    # (no held-out prompt, or data made before it existed) one line says so and training goes on.
    val_every: Optional[int] = None
    val_rows: Optional[int] = None  # at most this many val rows (the first ones) per evaluation; None: all
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class DeepSpeedConfig:
    stage: int = 2  # ZeRO stage 1, 2 or 3 (3 also partitions the frozen backbone)
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = True
    reduce_bucket_size: int = 200_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed config


@dataclass
class ExportConfig:
    layout: str = "full"  # full (all weights, like the official checkpoints) | heads (twins only)
    max_shard_size: str = "5GB"
    base_model_id: Optional[str] = None  # recorded in heads-only exports (defaults to model.path)


@dataclass
class HubConfig:
    repo_id: Optional[str] = None
    private: bool = False
    dry_run: bool = False
    force: bool = False
    tag: Optional[str] = None


@dataclass
class LauncherConfig(SlurmConfig):
    """launcher=local runs in this process (or under torchrun/deepspeed/srun); launcher=slurm writes a
    batch script into RUN/slurm/ and submits it (see docs/slurm.md for every field)."""
    type: str = "local"  # local | slurm


@dataclass
class PlanConfig:
    """stage=plan (orthrus_train/plan): the cost of this recipe on `gpus` x `gpu`, from recorded throughput."""
    gpus: Optional[int] = None  # default: launcher.nodes x launcher.gpus_per_node
    gpu: str = "h200"  # a device kind of orthrus_train/plan/throughput.json (h100, h200, a100)
    prompts: Optional[int] = None  # default: data.num_samples (required when that is unset)
    prompt_tokens: Optional[float] = None  # mean tokens of a rendered prompt (default: the recorded measurement)
    response_tokens: Optional[float] = None  # mean tokens of a response (default: the recorded measurement)
    format: str = "text"  # text | json


@dataclass
class RootConfig:
    recipe: str = "tiny"
    description: str = ""
    stage: str = "all"  # all (data, train, eval, export) | data | train | eval | export | publish | plan
    run_dir: Optional[str] = None  # default: outputs/<recipe>
    resume: str = "auto"  # auto (newest complete checkpoint) | never | a checkpoint path
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


STAGES = ("data", "train", "eval", "export", "publish")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key."""


def _one_of(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")


def validate(cfg: RootConfig) -> None:
    _one_of("stage", cfg.stage, ("all",) + STAGES + ("plan",))
    _one_of("plan.format", cfg.plan.format, ("text", "json"))
    _one_of("model.init", cfg.model.init, ("pretrained", "random"))
    _one_of("model.dtype", cfg.model.dtype, ("bfloat16", "float32", "float16"))
    _one_of("heads.type", cfg.heads.type, ("orthrus", "medusa"))
    _one_of("heads.attn_backend", cfg.heads.attn_backend, ("auto", "sdpa", "flex"))
    _one_of("train.loss", cfg.train.loss, ("kl", "ce"))
    _one_of("train.loss_backend", cfg.train.loss_backend, ("auto", "torch", "triton"))
    _one_of("train.precision", cfg.train.precision, ("bf16", "fp32"))
    _one_of("deepspeed.stage", cfg.deepspeed.stage, (0, 1, 2, 3))
    _one_of("export.layout", cfg.export.layout, ("full", "heads"))
    _one_of("launcher.type", cfg.launcher.type, ("local", "slurm"))
    _one_of("device", cfg.device, ("auto", "cpu", "cuda"))
    _one_of("train.wandb.mode", cfg.train.wandb.mode, ("offline", "online", "disabled"))
    if cfg.model.init == "pretrained" and not cfg.model.path:
        raise ConfigError(
            f"model.path is required for recipe {cfg.recipe!r}: point it at your checkpoint "
            f"(a Hugging Face folder, a .gguf file or a Hub id), e.g. model.path=/models/Qwen3-8B, "
            f"or use model.init=random to build the shape with random weights for memory/throughput planning")
    if cfg.model.init == "random" and not cfg.model.shape:
        raise ConfigError("model.shape is required with model.init=random (tiny, or a Qwen3 shape such as qwen3-8b)")
    if cfg.heads.init_from and cfg.stage in ("all", "train"):  # before the data stage spends hours
        from ..model.warm_start import source_problem
        if source_problem(cfg.heads.init_from):
            raise ConfigError(source_problem(cfg.heads.init_from))
    if cfg.heads.block_size < 2:
        raise ConfigError(f"heads.block_size must be >= 2, got {cfg.heads.block_size}")
    t = cfg.train
    if not math.isfinite(cfg.train.offset_decay) or cfg.train.offset_decay < 0:
        raise ConfigError(f"train.offset_decay must be a finite number >= 0 (0 = uniform), got {cfg.train.offset_decay}")
    for key in ("seq_len", "anchors_per_row", "micro_batch", "global_batch", "loss_chunk", "save_every", "log_every"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key} must be > 0, got {getattr(t, key)}")
    for key, ok, want in (("lr", t.lr >= 0, ">= 0 (0: the heads stay as initialised)"), ("epochs", t.epochs > 0, "> 0 (train.max_steps caps the steps)"),
                          ("temperature", t.temperature > 0, "> 0"), ("weight_decay", t.weight_decay >= 0, ">= 0"),
                          ("grad_clip", t.grad_clip >= 0, ">= 0 (0 = no clipping)"),
                          ("warmup_ratio", 0 <= t.warmup_ratio <= 1, "in [0, 1]"),
                          ("min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
                          ("keep_checkpoints", t.keep_checkpoints >= 0, ">= 0 (0 = keep every checkpoint)")):
        value = getattr(t, key)
        if not ok or not math.isfinite(value):
            raise ConfigError(f"train.{key} must be a finite number {want}, got {value}")
    if t.val_every is not None and t.val_every < 0:
        raise ConfigError(f"train.val_every must be >= 0 (0 = off) or null (at every checkpoint), got {t.val_every}")
    if t.val_rows is not None and t.val_rows <= 0:
        raise ConfigError(f"train.val_rows must be > 0 or null (every row of data/val), got {t.val_rows}")
    if t.global_batch % t.micro_batch:
        raise ConfigError(f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch={t.micro_batch}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two values in [0, 1), got {t.betas}")
    if cfg.data.seq_len != t.seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} and train.seq_len={t.seq_len} differ; set both "
                          "(recipes interpolate data.seq_len: ${train.seq_len})")
    if cfg.stage == "publish" and not cfg.hub.repo_id:
        raise ConfigError("stage=publish needs hub.repo_id=ORG/NAME")
