"""The stages and the run folder between them: data -> train -> eval -> export (-> publish).

Each stage reads only what the previous one wrote in the run folder, so stages can run separately,
on other machines, and be re-run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config.loader import to_dict, to_yaml
from .run_dir import RunDir, atomic_write_text

ALL = ("data", "train", "eval", "export")


def _dist():
    from .launch.dist_env import resolve_dist_env
    return resolve_dist_env()


def _barrier(dist) -> None:
    """All ranks finish a stage before any starts the next (rank 0 packs the data, writes the export)."""
    if dist.world_size > 1:
        torch.distributed.barrier()


def run_stages(cfg, run_root: Path) -> int:
    run = RunDir(run_root)
    dist = _dist()
    stages = ALL if cfg.stage == "all" else (cfg.stage,)
    if dist.world_size > 1:
        from .model.factory import resolve_device
        from .train.engine import init_distributed

        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(dist.local_rank)
        init_distributed(device, dist)
    if dist.rank == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config, to_yaml(cfg))
    for name in stages:
        t0 = time.perf_counter()
        if dist.rank == 0:
            print(f"\n=== stage {name} === ({run.root})", flush=True)
        STAGES[name](cfg, run, dist)
        _barrier(dist)
        if dist.rank == 0:
            print(f"=== stage {name} done in {time.perf_counter() - t0:.1f}s ===", flush=True)
    if dist.rank == 0 and cfg.recipe == "tiny" and "eval" in stages:
        print("\nNote: the tiny recipe runs a 2-layer demo backbone on the CPU; its numbers only show that the "
              "machinery works, not real acceptance or speed.")
    return 0


# ------------------------------------------------------------------------------------------ data
def stage_data(cfg, run: RunDir, dist) -> None:
    from .data.config import DataConfig
    from .data.regen import HFGenerator, eos_ids_for
    from .data.stage import run_data_stage
    from .launch.dist_env import resolve_data_shard
    from .model.factory import build_backbone, resolve_device, tokenizer_for

    if cfg.model.init == "random" and cfg.model.shape != "tiny":
        raise SystemExit("stage=data needs a tokenizer and a real backbone; model.init=random with a Qwen3 shape is "
                         "for training-throughput planning (run stage=train with data from another run)")
    # rank 0 writes RUN/tokenizer; the other ranks build the same tokenizer without writing
    tok = tokenizer_for(cfg, run.tokenizer if dist.rank == 0 else None)
    data_cfg = to_dict(cfg)["data"]
    # identify the tokenizer by its source, not by this run folder's copy, so that a copied data/ folder
    # still matches its configuration
    data_cfg["tokenizer"] = cfg.model.tokenizer or cfg.model.path or "byte-tokenizer"
    data_cfg["model"] = cfg.model.path
    shard = resolve_data_shard(dist=dist)
    generator = None
    if cfg.data.regenerate and not run.data_report.exists():  # finished data is never regenerated
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        backbone = build_backbone(cfg, device)
        generator = HFGenerator(backbone, eos_ids_for(backbone, tok), tok.pad_token_id if tok.pad_token_id is not None
                                else tok.eos_token_id, static_cache=cfg.data.static_cache)
    run_data_stage(DataConfig.from_dict(data_cfg), run.root, generator, tokenizer=tok, rank=shard.index,
                   world_size=shard.count)


# ------------------------------------------------------------------------------------------ train
def stage_train(cfg, run: RunDir, dist) -> None:
    from .train.engine import run_train

    if not (run.data / "train").exists():
        raise SystemExit(f"stage=train: {run.data / 'train'} not found; run stage=data first (same run_dir)")
    run_train(cfg, run, dist)


# ------------------------------------------------------------------------------------------ shared
def trained_model(cfg, run: RunDir, device=None):
    """Backbone + heads of the newest complete checkpoint, for eval and export."""
    from .model.factory import build_backbone, build_model, resolve_device, tokenizer_for
    from .train.checkpoint import find_resumable
    from .train.engine import load_heads

    folder = find_resumable(run.checkpoints)
    if folder is None:
        raise SystemExit(f"no complete checkpoint in {run.checkpoints}; run stage=train first (same run_dir)")
    device = device or resolve_device(cfg.device)
    tok = tokenizer_for(cfg, run.tokenizer)
    model = build_model(cfg, build_backbone(cfg, device), tok)
    load_heads(model, folder)
    return model.eval(), tok, folder


# ------------------------------------------------------------------------------------------ eval
def stage_eval(cfg, run: RunDir, dist) -> None:
    if dist.rank != 0:
        return
    from .eval.report import run_eval

    model, tok, folder = trained_model(cfg, run)
    print(f"[eval] heads from {folder}")
    run_eval(model, tok, cfg.eval, run.root, run_cfg=cfg)


# ------------------------------------------------------------------------------------------ export
def stage_export(cfg, run: RunDir, dist) -> None:
    if dist.rank != 0:
        return
    from .export.writer import export_folder

    if cfg.heads.type != "orthrus":
        print(f"[export] heads.type={cfg.heads.type}: only Orthrus heads export to the Orthrus format; skipped")
        return
    model, tok, folder = trained_model(cfg, run, device=torch.device("cpu"))
    training = json.loads(run.train_summary.read_text()) if run.train_summary.exists() else {}
    state = dict(model.backbone.state_dict())
    if model.mask_embedding is not None:  # no spare embedding row: the mask token's own vector
        state["mask_embedding"] = model.mask_embedding
    out = export_folder(state, model.config, tok, run.export, layout=cfg.export.layout,
                        block_size=model.block_size, mask_token_id=model.mask_token_id,
                        base_model_id=cfg.export.base_model_id or cfg.model.path, base_revision=cfg.model.revision,
                        extra_card_info={"recipe": cfg.recipe, "config": to_yaml(cfg), "training": training,
                                         "license": cfg.model.license},
                        run_dir=run.root, max_shard_size=cfg.export.max_shard_size, overwrite=True)
    print(f"[export] wrote {out} ({cfg.export.layout} layout) from {folder.name}")


# ------------------------------------------------------------------------------------------ publish
def stage_publish(cfg, run: RunDir, dist) -> None:
    if dist.rank != 0:
        return
    from .export.publish import publish

    publish(run.export, cfg.hub.repo_id, private=cfg.hub.private, revision_tag=cfg.hub.tag,
            dry_run=cfg.hub.dry_run, force=cfg.hub.force, run_dir=run.root)


STAGES = {"data": stage_data, "train": stage_train, "eval": stage_eval, "export": stage_export,
          "publish": stage_publish}
