"""heads.init_from: a new run starts from the twins of an export (ours full / heads-only, or the official
layout) or of a run folder, or from a Medusa run's heads, through the CLI, also under ZeRO-3 on 2 processes;
mismatched backbones, block sizes, mask tokens and head types are refused, named."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_FAST, free_port, orthrus

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
    # the run folder as another machine would get it: a copy, with its checkpoints
    copied = root / "run-copy"
    shutil.copytree(run, copied)
    return {"run": copied, "trained": run, "full": full, "heads": heads, "official": official}


@pytest.mark.parametrize("layout", ["full", "heads", "official", "run"])
def test_new_run_starts_from_the_exported_twins(trained, tiny_data, tmp_path, layout):
    """From each export layout, and from the trained run's folder (its newest checkpoint, which the exports
    were made from: a run continued on another machine from its heads)."""
    src = trained[layout]
    run = _copy_data(tiny_data, tmp_path / "b")
    # lr 0: the checkpoint after one step holds exactly the twins the run started from
    p = orthrus("recipe=tiny", f"run_dir={run}", "stage=train", *FAST, f"heads.init_from={src}", "train.lr=0",
                "train.max_steps=1", "train.save_every=1")
    assert f"heads initialised from {src} (optimizer state fresh)" in p.stdout
    if layout == "run":
        assert f"twins read from checkpoint {src / 'checkpoints' / 'step-00000030'}" in p.stdout
    assert "note: the heads' checkpoint ended" not in p.stdout  # lr 0: nothing re-warms
    exported = _twins(trained["full"] if layout == "run" else src)
    start = load_file(str(run / "checkpoints" / "step-00000001" / "heads.safetensors"))
    assert set(exported) == {k for k in start if "_diff." in k} and len(exported) == 12
    for k, v in exported.items():
        assert torch.equal(start[k], v), k
    # the first step sees the same rows and anchors as the trained run's first step (same data and seed):
    # its loss is the trained heads', far below the fresh start's
    fresh, warm = _losses(trained["trained"]), _losses(run)
    assert warm[0] < 0.75 * fresh[0], (warm[0], fresh)

    if layout == "full":  # resuming: the run's own checkpoint wins over init_from, and says so
        p = orthrus("recipe=tiny", f"run_dir={run}", "stage=train", *FAST, f"heads.init_from={src}",
                    "train.max_steps=2", "train.save_every=1")
        assert "ignored: resuming from checkpoint" in p.stdout and "the checkpoint wins" in p.stdout
        assert "heads initialised from" not in p.stdout
        assert "resumed from" in p.stdout


def test_a_rewarm_above_the_checkpoints_last_lr_is_noted(trained, tiny_data, tmp_path):
    """Continuing a run's heads at the recipe's peak lr, when the checkpoint's cosine schedule had ended at 0, says
    so (the measured cost of such a re-warm); the same lr from a source without a schedule (an export) does not."""
    from orthrus_train.model.warm_start import rewarm_note

    run = _copy_data(tiny_data, tmp_path / "r")
    p = orthrus("recipe=tiny", f"run_dir={run}", "stage=train", *FAST, f"heads.init_from={trained['run']}",
                "train.lr=1e-3", "train.max_steps=1", "train.save_every=1")
    note = [line for line in p.stdout.splitlines() if "note: the heads' checkpoint ended" in line]
    assert len(note) == 1 and "at lr 0;" in note[0] and "train.lr=0.001 (from 0)" in note[0], p.stdout[-2000:]
    run2 = _copy_data(tiny_data, tmp_path / "r2")
    p = orthrus("recipe=tiny", f"run_dir={run2}", "stage=train", *FAST, f"heads.init_from={trained['full']}",
                "train.lr=1e-3", "train.max_steps=1", "train.save_every=1")
    assert "heads initialised from" in p.stdout and "note: the heads' checkpoint" not in p.stdout
    assert "(10x)" in rewarm_note(1e-4, 1e-3, 0.05) and rewarm_note(1e-4, 3e-4, 0.05) is None
    assert rewarm_note(None, 1e-3, 0.05) is None


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
    assert p.returncode == 2 and "no such folder (give an export folder, a Hub id ORG/NAME, a run folder" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def medusa(tiny_data, tmp_path_factory):
    """A tiny Medusa run trained for 10 steps. stage=export skips it (exports carry Orthrus twins only) and
    says where its heads stay: the checkpoints, which heads.init_from reads."""
    run = _copy_data(tiny_data, tmp_path_factory.mktemp("medusa") / "m")
    orthrus("recipe=tiny", f"run_dir={run}", "stage=train", "heads=medusa", *FAST, "train.max_steps=10",
            "train.save_every=10")
    p = orthrus("recipe=tiny", f"run_dir={run}", "stage=export", "heads=medusa", *FAST)
    assert "skipped" in p.stdout and f"heads.init_from={run}" in p.stdout and not (run / "export").exists()
    return run


@pytest.mark.parametrize("source", ["run", "heads-file"])
def test_medusa_run_starts_from_a_medusa_runs_heads(medusa, tiny_data, tmp_path, source):
    """From a Medusa run's folder (its newest checkpoint), or from a folder holding only a copy of a
    checkpoint's heads.safetensors (what one copies to another machine)."""
    ckpt = medusa / "checkpoints" / "step-00000010"
    if source == "run":
        src = medusa
    else:
        src = tmp_path / "copied"
        src.mkdir()
        shutil.copy(ckpt / "heads.safetensors", src / "heads.safetensors")
    trained_heads = load_file(str(ckpt / "heads.safetensors"))
    assert len(trained_heads) == 2 * 3 and all(k.startswith("medusa_heads.") for k in trained_heads)
    # fresh Medusa heads are zeros (identity): equality below means the trained values were copied
    assert all(v.abs().sum() > 0 for k, v in trained_heads.items() if k.endswith(".weight"))
    run = _copy_data(tiny_data, tmp_path / "b")
    p = orthrus("recipe=tiny", f"run_dir={run}", "stage=train", "heads=medusa", *FAST, f"heads.init_from={src}",
                "train.lr=0", "train.max_steps=1", "train.save_every=1")
    assert f"heads initialised from {src} (optimizer state fresh); Medusa heads read from checkpoint" in p.stdout
    start = load_file(str(run / "checkpoints" / "step-00000001" / "heads.safetensors"))
    assert set(start) == set(trained_heads)
    for k, v in trained_heads.items():
        assert torch.equal(start[k], v), k


def _refused(*args):
    p = orthrus(*args, check=False)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "refused" in err[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
    return err[0]


def test_medusa_mismatches_and_head_types_are_refused_and_named(trained, medusa, tiny_data, tmp_path):
    run = _copy_data(tiny_data, tmp_path / "c")
    # an Orthrus export (or an Orthrus run) given to a Medusa run, and a Medusa run given to an Orthrus run
    err = _refused("recipe=tiny", f"run_dir={run}", "stage=train", "heads=medusa", *FAST,
                   f"heads.init_from={trained['full']}")
    assert "holds Orthrus twins (an export) but this run trains Medusa heads (heads.type=medusa)" in err, err
    err = _refused("recipe=tiny", f"run_dir={run}", "stage=train", *FAST, f"heads.init_from={medusa}")
    assert "holds Medusa heads (checkpoint " in err and "this run trains Orthrus twins (heads.type=orthrus)" in err
    # hidden size, vocabulary and number of heads (block size - 1), all named in one line
    err = _refused("recipe=tiny", f"run_dir={run}", "stage=train", "heads=medusa", *FAST,
                   f"heads.init_from={medusa}", "model.init=random", "model.shape=tiny", "model.tiny.hidden_size=32",
                   "model.tiny.heads=1", "model.tiny.kv_heads=1", "model.tiny.vocab_size=330", "heads.block_size=8",
                   "model.mask_token_id=300", "model.force_mask_token_id=true")
    for named in ("hidden size: source 64, this run 32", "vocabulary: source 320, this run 330",
                  "block size: source 4, this run 8 (7 Medusa heads)"):
        assert named in err, (named, err)
    assert "mask token" not in err and "layers" not in err  # Medusa heads depend on neither
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


@pytest.mark.slow
def test_zero3_two_processes_start_from_the_exported_twins(trained, tiny_data, tmp_path):
    """Under ZeRO-3 the twins are built partitioned across the ranks (make_twin under zero.Init): the warm
    start gathers each one, writes the export's values and re-partitions it. 2 CPU processes (gloo), lr 0:
    the consolidated heads of the step-1 checkpoint are exactly the export's; a run without init_from is not."""
    src = trained["full"]
    env = dict(os.environ, ORTHRUS_NO_PROGRESS="1", OMP_NUM_THREADS="1")

    def two_procs(run, *extra):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "-m", "orthrus_train", "recipe=tiny", f"run_dir={run}",
                            "stage=train", *FAST, "deepspeed=zero3", "train.lr=0", "train.max_steps=1",
                            "train.save_every=1", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["zero_stage"] == 3
        return p, load_file(str(run / "checkpoints" / "step-00000001" / "heads.safetensors"))

    warm_run = _copy_data(tiny_data, tmp_path / "warm")
    p, warm = two_procs(warm_run, f"heads.init_from={src}")
    assert p.stdout.count(f"heads initialised from {src} (optimizer state fresh)") == 1  # rank 0 says it, once
    # the twins really were partitioned when the warm start wrote them (a partition's .shape is empty)
    assert "12 of 12 partitioned (ZeRO-3): gathered, written, re-partitioned" in p.stdout, p.stdout[-2000:]
    exported = _twins(src)
    assert set(exported) == {k for k in warm if "_diff." in k} and len(exported) == 12
    for k, v in exported.items():
        assert torch.equal(warm[k], v), k

    cold_run = _copy_data(tiny_data, tmp_path / "cold")
    _, cold = two_procs(cold_run)
    assert any(not torch.equal(cold[k], v) for k, v in exported.items())


def test_eval_of_exported_heads_without_a_checkpoint(trained, tiny_data, tmp_path):
    """stage=eval in a run with no checkpoint evaluates heads.init_from's heads as they are (published or exported
    heads measured before fine-tuning): the same numbers as the run that trained them, and the report names the
    source. Without init_from the refusal says how to ask for it."""
    small = ["eval.num_prompts=3", "eval.max_new_tokens=8", "eval.temperatures=[0.0]", "eval.lossless.enabled=false",
             "eval.plots=false", "eval.ar_baseline=false"]
    run = _copy_data(tiny_data, tmp_path / "e")
    p = orthrus("recipe=tiny", f"run_dir={run}", "stage=eval", *FAST, *small, check=False)
    assert p.returncode != 0 and "no complete checkpoint" in p.stderr + p.stdout
    assert "heads.init_from=PATH to evaluate exported or published heads" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr
    p = orthrus("recipe=tiny", f"run_dir={run}", "stage=eval", *FAST, *small, f"heads.init_from={trained['heads']}")
    assert f"heads from heads.init_from={trained['heads']}" in p.stdout
    rep = json.loads((run / "eval" / "report.json").read_text())
    assert rep["model"]["heads"] == f"heads.init_from={trained['heads']}"
    assert f"heads from heads.init_from={trained['heads']}" in (run / "eval" / "report.md").read_text()
    ref_run = tmp_path / "ref"
    shutil.copytree(trained["trained"], ref_run)
    orthrus("recipe=tiny", f"run_dir={ref_run}", "stage=eval", *FAST, *small)
    ref = json.loads((ref_run / "eval" / "report.json").read_text())
    assert ref["model"]["heads"] == "step-00000030"
    for name, b in ref["benchmarks"].items():
        mine, theirs = rep["benchmarks"][name]["results"]["T=0"]["spec"], b["results"]["T=0"]["spec"]
        assert (mine["emitted_tokens"], mine["verify_passes"]) == (theirs["emitted_tokens"], theirs["verify_passes"])
