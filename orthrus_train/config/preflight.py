"""Checks that look at this machine, made by the CLI after compose() and before anything is written.

compose() checks the configuration's shape (keys, types, required values); `preflight` checks that the
run it describes can start: the local files and folders it names exist (model, tokenizer, data sources,
eval benchmark files, for the stages that read them), and the stages asked for can run with this model
(random weights have no data stage). Each problem is one ConfigError line saying what and how to fix it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from .schema import ConfigError

PIPELINE = ("data", "train", "eval", "export")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "org/name"


def looks_local(path: str) -> bool:
    """True for a value that can only be a file or folder on this machine, never a Hub id."""
    if path in (".", "..") or path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf"):
        return True
    return os.sep in path and not _HUB_ID.fullmatch(path)


def is_hub_id(value: str) -> bool:
    """True for "name" or "org/name" that is not a file or folder here (so it can only mean the Hub)."""
    return bool(_HUB_ID.fullmatch(value)) and not looks_local(value) and not os.path.exists(value)


def _part_index(p: Path) -> tuple[int, str]:
    digits = re.sub(r"\D", "", p.name.rsplit(".part", 1)[-1])
    return (int(digits) if digits else -1, p.name)


def join_hint(path: Path) -> str | None:
    """How to join `path` from its split parts (`FILE.part0`, `FILE.part1`, ... beside it), or None."""
    parts = sorted((p for p in path.parent.glob(glob_escape(path.name) + ".part*") if p.is_file()), key=_part_index)
    if not parts:
        return None
    in_place = os.access(path.parent, os.W_OK)
    target = path if in_place else Path.cwd() / path.name
    cmd = f"cat {' '.join(shlex.quote(str(p)) for p in parts)} > {shlex.quote(str(target))}"
    names = ", ".join(p.name for p in parts)
    readme = " (see README.md there)" if (path.parent / "README.md").exists() else ""
    then = "" if in_place else f", then set model.path={target} (its folder is read-only)"
    return f"join its {len(parts)} parts ({names}){readme} with `{cmd}`{then}"


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def missing(key: str, value: str | None, what: str) -> str | None:
    """The error line for a local-looking `value` of `key` that does not exist, else None."""
    if not value or not looks_local(value):
        return None
    path = Path(os.path.expanduser(value))
    whole = re.sub(r"\.part\d+$", "", path.name)
    if path.is_file() and whole != path.name:  # one part of a split file, e.g. X.gguf.part0
        return (f"{key}={value} is one part of a split file: " + join_hint(path.with_name(whole))
                + f"; {key} names the joined file")
    if path.exists():
        return None
    hint = join_hint(path)
    return f"{key}={value}: no such file or folder; " + (hint or f"set {key} to {what}")


MODEL_WHAT = "a local Hugging Face model folder, a .gguf file, or a Hub id (org/name)"


def stages_of(cfg) -> tuple[str, ...]:
    """The pipeline stages this invocation runs (Slurm's separate_stages runs all of them)."""
    return PIPELINE if cfg.stage == "all" else (cfg.stage,)


def preflight(cfg, run_root: Path, *, submitting: bool = False) -> list[str]:
    """Raise ConfigError for the first problem that would stop the run; return notes (non-fatal).

    submitting: a Slurm submission (dry run or not); a missing RUN/data/train for stage=train is then only a
    note on a dry run (the data may be copied in before the real submission)."""
    stages = stages_of(cfg)
    notes: list[str] = []
    existing = next(p for p in (run_root, *run_root.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"run_dir={run_root}: {existing} is a file, not a folder; set run_dir to a new folder or "
                          "to the folder of an earlier run")
    m = cfg.model
    if m.init == "random" and m.shape != "tiny" and "data" in stages:
        raise ConfigError(
            f"model.init=random with stage={cfg.stage}: the data stage needs real weights (the model writes the "
            "training responses); to plan memory/throughput use stage=train on packed data of a run with the same "
            "tokenizer and train.seq_len copied into the run folder (cp -r OTHER_RUN/data RUN/), or give "
            "model.path= and drop model.init=random")
    model_stages = set(stages) & set(PIPELINE)
    checks = []
    if model_stages and m.init == "pretrained":
        checks.append(("model.path", m.path, MODEL_WHAT))
    if model_stages and m.tokenizer:
        checks.append(("model.tokenizer", m.tokenizer, "a tokenizer folder or Hub id"))
    data_done = (run_root / "data" / "report.json").exists()  # finished data is never read again
    if "data" in stages and not data_done:
        for i, s in enumerate(cfg.data.sources):
            checks.append((f"data.sources[{i}].path_or_id", s.path_or_id,
                           "a local .jsonl/.json/.parquet/.arrow file, a save_to_disk folder or a Hub dataset id"))
    if "eval" in stages:
        for name in cfg.eval.benchmarks:
            if name in cfg.eval.benchmark_paths:
                checks.append((f"eval.benchmark_paths.{name}", cfg.eval.benchmark_paths[name],
                               "a local .jsonl/.json/.parquet file"))
        if cfg.eval.train_prompts_file:
            checks.append(("eval.train_prompts_file", cfg.eval.train_prompts_file, "an existing file"))
    for key, value, what in checks:
        err = missing(key, value, what)
        if err:
            raise ConfigError(err)
    if model_stages and m.init == "pretrained" and m.path and os.path.exists(os.path.expanduser(m.path)):
        local = Path(os.path.expanduser(m.path))
        if local.is_dir() and not (local / "config.json").is_file():
            inside = sorted(p.parent.name for p in local.glob("*/config.json"))[:3]
            raise ConfigError(f"model.path={m.path}: no config.json in this folder, so it is no Hugging Face model folder; "
                              + (f"did you mean a folder inside it ({', '.join(inside)})?" if inside else
                                 "point model.path at the folder holding config.json and the weights, or at a .gguf file"))
        if local.is_file() and local.suffix != ".gguf":
            raise ConfigError(f"model.path={m.path}: a file that is not a .gguf; set model.path to {MODEL_WHAT}")
    if "data" in stages and not data_done:
        from ..data.sources import LOCAL_SUFFIXES
        for i, s in enumerate(cfg.data.sources):
            if os.path.isfile(s.path_or_id) and not s.path_or_id.endswith(LOCAL_SUFFIXES):
                raise ConfigError(f"data.sources[{i}].path_or_id={s.path_or_id}: unknown file type; convert it to one of "
                                  f"{', '.join(LOCAL_SUFFIXES)} (e.g. JSONL, one JSON object a line)")
    init = cfg.heads.init_from
    if init and set(stages) & {"train", "eval", "export"} and not Path(os.path.expanduser(init)).is_dir():
        from ..model.warm_start import hub_problem  # a Hub id (schema.validate refused anything else)
        problem = hub_problem(init)
        if problem:
            raise ConfigError(problem)
    if cfg.resume not in ("auto", "never") and "train" in stages:
        if not (Path(os.path.expanduser(cfg.resume)) / "COMPLETE").is_file():
            raise ConfigError(f"resume={cfg.resume}: not a complete checkpoint folder; set resume=auto (the newest "
                              "complete checkpoint of the run folder), resume=never or RUN/checkpoints/step-N")
    newest = _newest_checkpoint(run_root / "checkpoints")
    if newest is not None and cfg.resume == "never" and "train" in stages:
        # the new checkpoints would be pruned against the earlier training's (by step) and could vanish at once
        raise ConfigError(f"resume=never: {run_root / 'checkpoints'} already holds {newest.name} of an earlier training; "
                          "use a new run_dir to train from scratch (or move that checkpoints folder away), or resume=auto "
                          "to continue it")
    reads_checkpoint = set(stages) & {"eval", "export"} or ("train" in stages and cfg.resume == "auto")
    if newest is not None and reads_checkpoint:
        try:
            trained = json.loads((newest / "trainer_state.json").read_text()).get("head_type")
        except (OSError, ValueError):
            trained = None  # a damaged checkpoint: the stage reports it and takes the previous one
        if trained and trained != cfg.heads.type:
            raise ConfigError(f"heads.type={cfg.heads.type}, but {newest} holds {trained} heads (this run folder trained "
                              f"heads.type={trained}); use a new run_dir for {cfg.heads.type} heads")
    if "train" in stages and "data" not in stages and not (run_root / "data" / "train").exists():
        msg = (f"stage=train: {run_root / 'data' / 'train'} not found; run stage=data first (same run_dir), or copy "
               "data/ of a run on the same tokenizer and train.seq_len into the run folder")
        if submitting and cfg.launcher.dry_run:
            notes.append(msg + " before submitting")
        else:
            raise ConfigError(msg)
    for stage in ("eval", "export"):
        needs_checkpoint = not (stage == "eval" and cfg.heads.init_from) and not (stage == "export"
                                                                                 and cfg.heads.type != "orthrus")
        if stage in stages and "train" not in stages and needs_checkpoint and newest is None:
            msg = (f"stage={stage}: no complete checkpoint in {run_root / 'checkpoints'}; run stage=train first "
                   "(same run_dir)" + (" or set heads.init_from=PATH to evaluate exported or published heads"
                                       if stage == "eval" else ""))
            if submitting and cfg.launcher.dry_run:
                notes.append(msg + " before submitting")
            else:
                raise ConfigError(msg)
    return notes


def _newest_checkpoint(root: Path) -> Path | None:
    """The first of the folders a resume would try (`checkpoint_candidates`) that has its COMPLETE marker; its
    files are not loaded here (the stage does that, and skips a damaged one for the one before)."""
    from ..run_dir import checkpoint_candidates
    return next((c for c in checkpoint_candidates(root) if (c / "COMPLETE").is_file()), None)
