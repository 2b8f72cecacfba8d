"""The checkpoint format, in one place.

    checkpoints/
      step-00000040/                 DeepSpeed files (twins only: frozen weights are excluded),
        rng_rank{r}.pt               every rank's RNG states
        heads.safetensors            the heads, consolidated (eval/export and heads.init_from read it); its
                                     metadata: head_type, block_size, mask_token_id, backbone (JSON: family, shape)
        trainer_state.json           step, epoch, data position, metrics at save time
        manifest.json                every file with its size (written last, by rank 0)
        COMPLETE                     marker: the folder is whole
      latest                         text: the tag of the newest complete checkpoint (replaced atomically)

A checkpoint is written as `.tmp-step-N/` and renamed only after every rank finished, so a crash
mid-write leaves a `.tmp-*` folder that is ignored (and removed by the next save). On resume every
candidate is checked against its manifest before anything is loaded; a damaged one is reported and
the previous complete one is used.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from ..run_dir import LATEST, atomic_write_json, atomic_write_text, checkpoint_candidates



def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save(engine, root: Path, step: int, trainer_state: dict, rank: int, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    root.mkdir(parents=True, exist_ok=True)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    final = root / tag
    if rank == 0 and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"trainer_state": trainer_state},
                           save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        tmp = root / tmp_tag
        atomic_write_json(tmp / "trainer_state.json", trainer_state)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "manifest.json"}
        atomic_write_json(tmp / "manifest.json", {"tag": tag, "step": step, "files": files})
        (tmp / "COMPLETE").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / "COMPLETE").exists())
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def problems(folder: Path, rank: int | None = None) -> list[str]:
    """Why `folder` is not a loadable complete checkpoint (empty list: it is)."""
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    if not (folder / "COMPLETE").exists():
        return [f"{folder} has no COMPLETE marker (the write was interrupted)"]
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return [f"{folder}/manifest.json unreadable: {e}"]
    out = []
    for name, size in manifest["files"].items():
        p = folder / name
        if not p.exists():
            out.append(f"{p} is missing")
        elif p.stat().st_size != size:
            out.append(f"{p} has {p.stat().st_size} bytes, manifest says {size}")
    if out:
        return out
    # Trial-open the files this rank will read (cheap with mmap) so a corrupt file is caught before
    # any state is loaded.
    for name in manifest["files"]:
        if not name.endswith(".pt"):
            continue
        if rank is not None and name.startswith("rng_rank") and name != f"rng_rank{rank}.pt":
            continue
        try:
            torch.load(folder / name, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure means unreadable
            out.append(f"{folder / name} is unreadable: {e.__class__.__name__}: {str(e)[:200]}")
    return out


def find_resumable(root: Path, rank: int | None = None, log=print) -> Path | None:
    """The newest complete, readable checkpoint; damaged candidates are reported and skipped."""
    for c in checkpoint_candidates(root):
        bad = problems(c, rank)
        if not bad:
            return c
        log(f"[checkpoint] skipping {c.name}: " + "; ".join(bad))
    return None


def load(engine, folder: Path, rank: int) -> dict:
    """Load a folder that `problems()` accepted. Returns the trainer state."""
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}")
    set_rng_state(torch.load(folder / f"rng_rank{rank}.pt", map_location="cpu", weights_only=False))
    return json.loads((folder / "trainer_state.json").read_text())
