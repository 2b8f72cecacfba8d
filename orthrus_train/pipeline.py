"""The stages and the run folder between them: data -> train -> eval -> export (-> publish).

Each stage reads only what the previous one wrote in the run folder, so stages can run separately,
on other machines, and be re-run. Running the same command again skips what is finished and resumes
what is not (README "Stages and the run folder"):

    data    finished when RUN/data/report.json exists and its fingerprint (data config + tokenizer content)
            matches; otherwise the stage runs, resuming regeneration shards. Data made with another config
            is an error, never overwritten.
    train   finished when the newest complete checkpoint is at the configured number of steps (resume=auto);
            otherwise training resumes from the newest complete checkpoint.
    eval    (stage=all) finished when RUN/stages/eval.json records the same inputs: checkpoint, eval/model/heads
            settings and data; otherwise it runs again from the start.
    export  (stage=all) finished when RUN/stages/export.json records the same inputs: checkpoint, export/model/heads
            settings and the eval report the card shows; otherwise it is written again.

Rank 0 reads the run folder and decides; every rank takes its decision.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .config.loader import to_dict, to_yaml
from .run_dir import RunDir, atomic_write_json, atomic_write_text

ALL = ("data", "train", "eval", "export")

# Set once this process has run its stages as one rank of several and left the process group: the command's
# exit then skips interpreter teardown (see :func:`orthrus_train.cli.exit_process`).
LEFT_MULTI_RANK_RUN = False

# Seconds to pause after each regeneration batch and before the eval starts (tests only: a kill -9 test can
# land inside the stage on any machine). The trainer reads the same variable after each step.
_DEBUG_SLEEP = float(os.environ.get("ORTHRUS_DEBUG_STEP_SLEEP", "0") or 0)


def _dist():
    from .launch.dist_env import resolve_dist_env
    return resolve_dist_env()


def _barrier(dist) -> None:
    """All ranks finish a stage before any starts the next (rank 0 packs the data, writes the export)."""
    if dist.world_size > 1:
        torch.distributed.barrier()


def _agree(dist, decide):
    """Rank 0 decides (it alone reads the run folder here); every rank returns its answer or raises its error,
    so all ranks skip or run a stage together."""
    out = None
    if dist.rank == 0:
        try:
            out = ("ok", decide())
        except BaseException as e:  # noqa: BLE001 - re-raised on every rank
            out = ("error", e)
    if dist.world_size > 1:
        box = [out]
        torch.distributed.broadcast_object_list(box, src=0)
        out = box[0]
    if out[0] == "error":
        raise out[1]
    return out[1]


def run_stages(cfg, run_root: Path) -> int:
    from .model.factory import resolve_device
    from .train.engine import init_distributed, name_deepspeed_accelerator

    dist = _dist()
    device = resolve_device(cfg.device)
    name_deepspeed_accelerator(device)
    if dist.world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(dist.local_rank)
        init_distributed(device, dist)
    rc = _run_stages(cfg, RunDir(run_root), dist)
    _leave_process_group()  # reached only on success: an error propagates before it
    return rc


def _leave_process_group() -> None:
    """After a successful run, leave the process group before the interpreter exits. Left to exit-time
    destructors, one rank's gloo threads could be torn down while another rank still closed its connections,
    and the process aborted ("terminate called without an active exception", SIGABRT) after every stage had
    succeeded: a re-run whose stages were all complete failed its Slurm job about one time in six (CI,
    session 11). The ranks meet first, so none leaves while another still talks to it. After an error nothing
    changes: the other ranks may be stuck elsewhere, and waiting for them would turn an error into a hang."""
    global LEFT_MULTI_RANK_RUN
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    LEFT_MULTI_RANK_RUN = True


def _run_stages(cfg, run: RunDir, dist) -> int:
    stages = ALL if cfg.stage == "all" else (cfg.stage,)
    if dist.rank == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config, to_yaml(cfg))
    ran = []
    for name in stages:
        t0 = time.perf_counter()
        finished = FINISHED.get(name)
        done = _agree(dist, lambda: finished(cfg, run, dist, cfg.stage == "all")) if finished else None
        if done:
            if dist.rank == 0:
                print(f"{name}: {done}, skipped", flush=True)
            continue
        if dist.rank == 0:
            print(f"\n=== stage {name} === ({run.root})", flush=True)
        STAGES[name](cfg, run, dist)
        ran.append(name)
        _barrier(dist)
        if dist.rank == 0:
            print(f"=== stage {name} done in {time.perf_counter() - t0:.1f}s ===", flush=True)
    if dist.rank == 0 and cfg.recipe == "tiny" and "eval" in stages:
        where = "above" if "eval" in ran else "in the report below"  # a re-run skips the eval and prints no table
        print("\nNote: the tiny recipe runs a 2-layer demo backbone on the CPU; its numbers show that the "
              f"machinery works and that training helps (untrained vs trained heads {where}), not real acceptance "
              "or speed.")
    if dist.rank == 0 and "eval" in stages and run.eval_report_md.exists():
        print(f"report: {run.eval_report_md}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------ finished?
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _newest_checkpoint(run: RunDir):
    from .train.checkpoint import find_resumable
    return find_resumable(run.checkpoints, 0, log=lambda *_: None)


def _inputs(cfg, folder: Path | None, sections: tuple[str, ...], files: tuple[Path, ...]) -> dict:
    """What a stage's output was made from: the checkpoint (by its trainer_state.json, unique to one
    training; None: heads.init_from's heads, by `_init_from_id`), the named config sections and the content of
    the named files (absent: None)."""
    c = to_dict(cfg)
    if folder is None:
        ckpt = {"checkpoint": f"heads.init_from={cfg.heads.init_from}",
                "checkpoint_id": _init_from_id(os.fspath(cfg.heads.init_from))}
    else:
        ckpt = {"checkpoint": folder.name, "checkpoint_id": _sha((folder / "trainer_state.json").read_bytes())}
    return {**ckpt,
            "config": _sha(json.dumps({k: c[k] for k in sections}, sort_keys=True, default=str).encode()),
            "files": {f.name: _sha(f.read_bytes()) if f.exists() else None for f in files}}


EVAL_SECTIONS = ("recipe", "device", "model", "heads", "eval")
EXPORT_SECTIONS = ("recipe", "model", "heads", "export")


def _eval_inputs(cfg, run: RunDir, folder: Path) -> dict:
    return _inputs(cfg, folder, EVAL_SECTIONS, (run.data_report,))


def _export_inputs(cfg, run: RunDir, folder: Path) -> dict:
    return _inputs(cfg, folder, EXPORT_SECTIONS, (run.eval_report, run.train_summary))


def _marker_matches(run: RunDir, stage: str, inputs: dict) -> bool:
    marker = run.stage_marker(stage)
    try:
        return json.loads(marker.read_text()).get("inputs") == inputs
    except (OSError, ValueError):
        return False


def _write_marker(run: RunDir, stage: str, inputs: dict) -> None:
    atomic_write_json(run.stage_marker(stage), {"stage": stage, "inputs": inputs,
                                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _data_finished(cfg, run: RunDir, dist, all_stages: bool) -> str | None:
    from .data.stage import finished_report
    from .model.factory import tokenizer_for

    if not run.data_report.exists():
        return None
    report = finished_report(_data_config(cfg), run.root, tokenizer_for(cfg, run.tokenizer))  # raises on mismatch
    return f"complete ({report['rows_written']} rows in {run.data})"


def _train_finished(cfg, run: RunDir, dist, all_stages: bool) -> str | None:
    from .data.pack import PackedDataset
    from .train.engine import make_plan

    if cfg.resume != "auto" or not (run.data / "train" / "index.json").exists():
        return None
    folder = _newest_checkpoint(run)
    if folder is None:
        return None
    step = json.loads((folder / "trainer_state.json").read_text())["step"]
    total = make_plan(PackedDataset(run.data / "train").total_rows, cfg.train, dist.world_size).total_steps
    return f"complete at step {step}" if step >= total else None


def _eval_finished(cfg, run: RunDir, dist, all_stages: bool) -> str | None:
    folder = _newest_checkpoint(run) if all_stages else None  # an explicit stage=eval always runs
    if folder is None or not (run.eval_report.exists() and run.eval_report_md.exists()):
        return None
    if not _marker_matches(run, "eval", _eval_inputs(cfg, run, folder)):
        return None
    return f"complete from {folder.name} ({run.eval_report_md})"


def _export_finished(cfg, run: RunDir, dist, all_stages: bool) -> str | None:
    folder = _newest_checkpoint(run) if all_stages else None
    if folder is None or not (run.export / "config.json").exists():
        return None
    if not _marker_matches(run, "export", _export_inputs(cfg, run, folder)):
        return None
    return f"complete from {folder.name} ({run.export})"


FINISHED = {"data": _data_finished, "train": _train_finished, "eval": _eval_finished, "export": _export_finished}


# ------------------------------------------------------------------------------------------ data
def _data_config(cfg):
    from .data.config import DataConfig

    data_cfg = to_dict(cfg)["data"]
    # the stage identifies the tokenizer by its content (RUN/tokenizer is the same tokenizer as the model's)
    data_cfg["tokenizer"] = cfg.model.tokenizer or cfg.model.path
    data_cfg["model"] = cfg.model.path
    return DataConfig.from_dict(data_cfg)


class _PausedGenerator:
    """Testing hook (ORTHRUS_DEBUG_STEP_SLEEP): pause after each regeneration batch."""

    def __init__(self, generator, seconds: float):
        self._generator, self._seconds = generator, seconds

    def generate(self, *args, **kwargs):
        out = self._generator.generate(*args, **kwargs)
        time.sleep(self._seconds)
        return out

    def generate_stream(self, *args, **kwargs):  # the engine backend: a pause after each response
        for item in self._generator.generate_stream(*args, **kwargs):
            time.sleep(self._seconds)
            yield item

    def __getattr__(self, name):
        return getattr(self._generator, name)


def stage_data(cfg, run: RunDir, dist) -> None:
    from .data.stage import LazyGenerator, run_data_stage
    from .data.templates import ChatRenderer
    from .launch.dist_env import resolve_data_shard
    from .model.factory import build_backbone, resolve_device, tokenizer_for

    if cfg.model.init == "random" and cfg.model.shape != "tiny":
        raise SystemExit("stage=data needs a tokenizer and a real backbone; model.init=random with a Qwen3 shape is "
                         "for training-throughput planning (run stage=train with data from another run)")
    # rank 0 writes RUN/tokenizer; the other ranks build the same tokenizer without writing
    tok = tokenizer_for(cfg, run.tokenizer if dist.rank == 0 else None)
    shard = resolve_data_shard(dist=dist)
    data = _data_config(cfg)
    generator = None
    if cfg.data.regenerate and not run.data_report.exists():  # finished data is never regenerated
        def load():  # only when there is something to generate (after the data mix was checked)
            device = resolve_device(cfg.device)
            if device.type == "cuda":
                device = torch.device("cuda", dist.local_rank)
            return build_backbone(cfg, device)

        generator = LazyGenerator(data, tok, ChatRenderer._stop_ids(tok, data.chat_template.stop_tokens), load)
        if _DEBUG_SLEEP:
            generator = _PausedGenerator(generator, _DEBUG_SLEEP)
    run_data_stage(data, run.root, generator, tokenizer=tok, rank=shard.index, world_size=shard.count)
    if generator is not None:  # the regeneration model, KV cache and graphs leave the GPU to training
        import gc

        del generator
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ train
def stage_train(cfg, run: RunDir, dist) -> None:
    from .train.engine import run_train

    if not (run.data / "train").exists():
        raise SystemExit(f"stage=train: {run.data / 'train'} not found; run stage=data first (same run_dir)")
    run_train(cfg, run, dist)


# ------------------------------------------------------------------------------------------ shared
def trained_model(cfg, run: RunDir, device=None, init_from_ok: bool = False):
    """Backbone + heads of the newest complete checkpoint, for eval and export. `init_from_ok` (eval): a run with
    no checkpoint takes its heads from `heads.init_from` instead (published or exported heads evaluated as they
    are, e.g. before fine-tuning them); the folder returned is then None."""
    from .model.factory import build_backbone, build_model, resolve_device, tokenizer_for
    from .train.checkpoint import find_resumable
    from .train.engine import load_heads

    folder = find_resumable(run.checkpoints)
    from_init = folder is None and init_from_ok and bool(cfg.heads.init_from)
    if folder is None and not from_init:
        hint = " (or set heads.init_from=PATH to evaluate exported or published heads)" if init_from_ok else ""
        raise SystemExit(f"no complete checkpoint in {run.checkpoints}; run stage=train first (same run_dir){hint}")
    device = device or resolve_device(cfg.device)
    tok = tokenizer_for(cfg, run.tokenizer)
    model = build_model(cfg, build_backbone(cfg, device), tok)
    if from_init:
        from .model.warm_start import load_into
        described = load_into(model, os.fspath(cfg.heads.init_from))
        print(f"[eval] no checkpoint in {run.checkpoints}: heads from heads.init_from={cfg.heads.init_from} "
              f"({described})", flush=True)
    else:
        load_heads(model, folder)
    return model.eval(), tok, folder


def _init_from_id(path: str) -> str:
    """Identity of heads.init_from's content for the 'finished' marker: names, sizes and mtimes of a local
    folder's (or file's) files; a Hub id as given."""
    p = Path(path).expanduser()
    if not p.exists():
        return _sha(path.encode())
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return _sha(json.dumps([(str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size,
                             f.stat().st_mtime_ns) for f in files]).encode())


# ------------------------------------------------------------------------------------------ eval
def stage_eval(cfg, run: RunDir, dist) -> None:
    if dist.rank != 0:
        return
    from .eval.report import run_eval

    run.stage_marker("eval").unlink(missing_ok=True)  # a stage killed from here on leaves no 'finished' marker
    model, tok, folder = trained_model(cfg, run, init_from_ok=True)
    inputs = _eval_inputs(cfg, run, folder)
    if folder is not None:
        print(f"[eval] heads from {folder}")
    if _DEBUG_SLEEP:  # testing hook: a kill -9 test lands inside this stage
        run.eval.mkdir(parents=True, exist_ok=True)
        time.sleep(_DEBUG_SLEEP)
    run_eval(model, tok, cfg.eval, run.root, run_cfg=cfg,
             heads_source=folder.name if folder is not None else f"heads.init_from={cfg.heads.init_from}")
    _write_marker(run, "eval", inputs)


# ------------------------------------------------------------------------------------------ export
def stage_export(cfg, run: RunDir, dist) -> None:
    if dist.rank != 0:
        return
    from .export.writer import export_folder

    if cfg.heads.type != "orthrus":
        print(f"[export] heads.type={cfg.heads.type}: only Orthrus heads export to the Orthrus format; skipped "
              f"(the heads stay in {run.checkpoints}; heads.init_from={run.root} warm-starts a Medusa run from them)")
        return
    run.stage_marker("export").unlink(missing_ok=True)
    model, tok, folder = trained_model(cfg, run, device=torch.device("cpu"))
    inputs = _export_inputs(cfg, run, folder)
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
    _write_marker(run, "export", inputs)
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
