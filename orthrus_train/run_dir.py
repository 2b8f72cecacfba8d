"""The run folder: the interface between stages. Names here are stable; README.md "Stages and the run folder".

    RUN/
      config.yaml            resolved configuration of the latest invocation
      tokenizer/             tokenizer used by every stage (the demo's byte tokenizer is written here)
      data/                  packed training rows (train/), the held-out prompts' rows (val/, same format; absent
                             without held-out prompts or in data made before it existed), holdout.jsonl,
                             rejected.jsonl, report.json
      checkpoints/           step-XXXXXXXX/ folders (complete ones carry COMPLETE) and `latest`
      metrics.jsonl          one JSON line per logged training step; the steps that validate (train.val_every)
                             carry val_loss, val_agreement, val_expected_accept, val_rows
      export/                Hugging Face folder (loadable with trust_remote_code)
      eval/                  report.json, report.md, *.png
      stages/                eval.json, export.json: written when that stage finished, with the inputs it was
                             made from (stage=all skips a stage whose marker matches the current inputs)
      slurm/                 batch scripts and job logs (launcher=slurm)
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_report(self) -> Path:
        return self.data / "report.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_report(self) -> Path:
        return self.eval / "report.json"

    @property
    def eval_report_md(self) -> Path:
        return self.eval / "report.md"

    def stage_marker(self, stage: str) -> Path:
        """Written last by a stage that has no natural 'done' file of its own (eval, export)."""
        return self.root / "stages" / f"{stage}.json"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


LATEST = "latest"  # the file in checkpoints/ naming the newest complete checkpoint folder


def checkpoint_candidates(root: Path) -> list[Path]:
    """The checkpoint folders of `root` (a run's checkpoints/) in the order a resume tries them: the one `latest`
    names first, then the step-* folders newest first. Whether each is complete and readable is the caller's
    check (`train.checkpoint.find_resumable` loads every file; the CLI's preflight only looks for COMPLETE)."""
    if not root.is_dir():
        return []
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
        candidates.insert(0, named)
    return candidates
