"""The product shell: recipes, structured config, errors that name the problem, packaging."""
import subprocess
import sys
import zipfile

import pytest

from orthrus_train.config.loader import available_recipes, compose
from orthrus_train.config.schema import ConfigError
from tests.conftest import REPO, orthrus

RECIPES = ["tiny", "smollm2-135m", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b",
           "qwen3-30b-a3b", "qwen3-72b"]


def test_all_recipes_exist_and_compose():
    assert sorted(RECIPES) == available_recipes()
    for r in RECIPES:
        cfg = compose(r, ["model.path=/some/checkpoint"] if r == "qwen3-72b" else [])
        assert cfg.recipe == r and cfg.heads.block_size >= 2
        assert cfg.data.seq_len == cfg.train.seq_len
        assert cfg.launcher.env.get("NCCL_NVLS_ENABLE") == "0"
    big = compose("qwen3-72b", ["model.init=random"])
    assert big.deepspeed.stage == 3 and big.launcher.nodes > 1 and big.launcher.gpus_per_node == 8
    assert compose("qwen3-8b", []).heads.block_size == 32


def test_cfg_job_prints_without_loading_a_model():
    p = orthrus("recipe=qwen3-72b", "--cfg", "job", "train.lr=1e-4")
    assert "shape: qwen3-72b" in p.stdout and "lr: 0.0001" in p.stdout
    assert "model.path is required" in p.stderr  # says why it cannot run yet
    assert "Loading" not in p.stdout + p.stderr


@pytest.mark.parametrize("args,needle", [
    (["recipe=nope"], "available recipes: qwen3-0.6b"),
    (["train.bogus=1"], "unknown key 'train.bogus'"),
    (["train.lr=abc"], "train.lr"),
    (["recipe=qwen3-72b"], "model.path is required"),
    (["heads.type=eagle"], "heads.type"),
    (["train.global_batch=7", "train.micro_batch=2"], "train.global_batch=7"),
])
def test_bad_config_fails_with_named_key_and_writes_nothing(tmp_path, args, needle):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    p = orthrus(*args, f"run_dir={run}", check=False)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr
    assert sorted(x.name for x in run.iterdir()) == ["keep.txt"]
    assert (run / "keep.txt").read_text() == "precious"


def test_unknown_recipe_lists_recipes_in_process():
    with pytest.raises(ConfigError, match="tiny"):
        compose("does-not-exist")


def test_packages_listed_in_pyproject_match_the_tree():
    import tomllib
    py = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(py["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "orthrus_train").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {found - listed}"
    assert {"orthrus_kernels", "orthrus_train.recipes", "orthrus_train.configs"} <= listed


@pytest.mark.slow
def test_wheel_ships_recipes_and_configs_and_runs_non_editable(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("orthrus_train-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "orthrus_train/recipes/qwen3-72b.yaml" in names
    assert "orthrus_train/configs/orthrus.yaml" in names and "orthrus_train/configs/deepspeed/zero3.yaml" in names
    assert "orthrus_train/assets/tiny-qwen3/model.safetensors" in names
    assert any(n.startswith("orthrus_kernels/") for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    p = subprocess.run([sys.executable, "-m", "orthrus_train", "recipe=qwen3-8b", "--cfg", "job"], cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "shape: qwen3-8b" in p.stdout


@pytest.mark.parametrize("stage,needle", [
    ("train", "run stage=data first"),
    ("eval", "run stage=train first"),
    ("export", "run stage=train first"),
    ("publish", "no config.json"),
])
def test_stage_on_an_empty_run_folder_says_what_to_run(tmp_path, stage, needle):
    p = orthrus(f"stage={stage}", f"run_dir={tmp_path}", "hub.repo_id=me/x", "hub.dry_run=true", check=False)
    assert p.returncode != 0
    assert needle in p.stderr and "Traceback" not in p.stderr


def test_deepspeed_launcher_local_rank_argument_is_accepted():
    for args in (["--local_rank=3"], ["--local_rank", "3"]):
        p = orthrus(*args, "recipe=tiny", "--cfg", "job")
        assert "recipe: tiny" in p.stdout
