"""heads.init_from: a new run starts from the twins of an export (ours full / heads-only, or the official
layout), through the CLI; mismatched backbones, block sizes and mask tokens are refused, named."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_FAST, orthrus

FAST = TINY_FAST + ["train.wandb.mode=disabled"]
# several CLI training runs per test (plus the module fixture's): generous on a loaded CI machine
pytestmark = pytest.mark.timeout(3600)


def _copy_data(tiny_data, dest):
    shutil.copytree(tiny_data, dest)
    return dest


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _twins(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(str(f)).items() if "_diff." in k})
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A tiny run trained for 30 steps and exported in the three layouts init_from reads."""
    root = tmp_path_factory.mktemp("warm")
    run = _copy_data(tiny_data, root / "a")
    orthrus("recipe=tiny", f"run_dir={run}", "stage=train", *FAST, "train.max_steps=30", "train.save_every=30")
    orthrus("recipe=tiny", f"run_dir={run}", "stage=export", *FAST)
    full = root / "full"
    shutil.copytree(run / "export", full)
    orthrus("recipe=tiny", f"run_dir={run}", "stage=export", *FAST, "export.layout=heads")
    heads = root / "heads"
    shutil.copytree(run / "export", heads)
    # the official Orthrus layout (chiennv2000/orthrus): a Qwen3 config.json with block_size and mask_token_id,
    # the same tensor names, no field of ours
    official = root / "official"
    official.mkdir()
    shutil.copy(full / "model.safetensors", official / "model.safetensors")
    cfg = json.loads((full / "config.json").read_text())
    for k in ("backbone_model_type", "base_model_name_or_path", "base_revision", "base_sha256", "auto_map"):
        cfg.pop(k, None)
    cfg.update(model_type="qwen3", architectures=["OrthrusLM"])
    (official / "config.json").write_text(json.dumps(cfg))
    return {"run": run, "full": full, "heads": heads, "official": official}


@pytest.mark.parametrize("layout", ["full", "heads", "official"])
def test_new_run_starts_from_the_exported_twins(trained, tiny_data, tmp_path, layout):
    src = trained[layout]
    run = _copy_data(tiny_data, tmp_path / "b")
    # lr 0: the checkpoint after one step holds exactly the twins the run started from
    p = orthrus("recipe=tiny", f"run_dir={run}", "stage=train", *FAST, f"heads.init_from={src}", "train.lr=0",
                "train.max_steps=1", "train.save_every=1")
    assert f"heads initialised from {src} (optimizer state fresh)" in p.stdout
    exported = _twins(src)
    start = load_file(str(run / "checkpoints" / "step-00000001" / "heads.safetensors"))
    assert set(exported) == {k for k in start if "_diff." in k} and len(exported) == 12
    for k, v in exported.items():
        assert torch.equal(start[k], v), k
    # the first step sees the same rows and anchors as the trained run's first step (same data and seed):
    # its loss is the trained heads', far below the fresh start's
    fresh, warm = _losses(trained["run"]), _losses(run)
    assert warm[0] < 0.75 * fresh[0], (warm[0], fresh)

    if layout == "full":  # resuming: the run's own checkpoint wins over init_from, and says so
        p = orthrus("recipe=tiny", f"run_dir={run}", "stage=train", *FAST, f"heads.init_from={src}",
                    "train.max_steps=2", "train.save_every=1")
        assert "ignored: resuming from checkpoint" in p.stdout and "the checkpoint wins" in p.stdout
        assert "heads initialised from" not in p.stdout
        assert "resumed from" in p.stdout


def test_mismatch_is_refused_and_named(trained, tiny_data, tmp_path):
    """Every mismatch is named, in one line, before anything trains (one run checks them all)."""
    run = _copy_data(tiny_data, tmp_path / "c")
    p = orthrus("recipe=tiny", f"run_dir={run}", "stage=train", *FAST, f"heads.init_from={trained['full']}",
                "model.init=random", "model.shape=tiny", "model.tiny.hidden_size=32", "model.tiny.layers=3",
                "model.tiny.heads=1", "model.tiny.kv_heads=1", "model.tiny.vocab_size=330", "heads.block_size=8",
                "model.mask_token_id=300", "model.force_mask_token_id=true", check=False)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "refused" in err[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
    for named in ("hidden size: export 64, this run 32", "layers: export 2, this run 3", "heads: export 4, this run 1",
                  "kv heads: export 2, this run 1", "head dim: export 16, this run 32",
                  "vocabulary: export 320, this run 330", "block size: export 4, this run 8",
                  "mask token: export"):
        assert named in err[0], (named, err[0])
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_missing_export_is_refused_before_anything_runs(tmp_path):
    p = orthrus("recipe=tiny", f"run_dir={tmp_path / 'r'}", f"heads.init_from={tmp_path / 'nope'}", check=False)
    assert p.returncode == 2 and "no such export folder" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()


def test_medusa_warm_start_is_refused_before_anything_runs(tmp_path):
    p = orthrus("recipe=tiny", f"run_dir={tmp_path / 'r'}", "heads=medusa", f"heads.init_from={tmp_path}",
                check=False)
    assert p.returncode == 2 and "Medusa heads cannot be warm-started" in p.stderr
    assert not (tmp_path / "r").exists()
