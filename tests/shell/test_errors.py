"""Errors a user meets in the first hour, through the CLI as they run it: one actionable line, a non-zero
exit, nothing written (or, for rejected records, nothing lost). Most go through `cli.main` in this process
(the CLI's own code path, without a fresh interpreter per case); the first cases also run as a subprocess."""
import json
import subprocess
from types import SimpleNamespace

import pytest

from orthrus_train import cli
from orthrus_train.config import preflight
from tests.conftest import SHARED, orthrus


@pytest.fixture
def run_cli(capsys):
    """cli.main(args) -> an object like CompletedProcess (returncode, stdout, stderr)."""
    def run(*args, check=False):
        capsys.readouterr()
        rc = cli.main(list(args))
        out, err = capsys.readouterr()
        assert not check or rc == 0, err
        return SimpleNamespace(returncode=rc, stdout=out, stderr=err)
    return run


def _guarded_run(tmp_path):
    """A run folder holding one precious file: after a refused command it must hold exactly that."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    return run


def _untouched(run):
    return sorted(x.name for x in run.iterdir()) == ["keep.txt"] and (run / "keep.txt").read_text() == "precious"


def _error_line(p):
    """The one error line (the CLI prints nothing else on stderr for these)."""
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr
    return errors[0]


@pytest.mark.parametrize("args,needle", [
    (["recipe=qwen3-8b", "model.path=/nope"], "model.path=/nope: no such file or folder"),
    (["recipe=qwen3-8b", 'model.path="~/no-such-model-dir"'], "model.path=~/no-such-model-dir: no such file"),
    (["recipe=qwen3-8b", "model.path=~/no-such-model-dir"], "cannot parse the override 'model.path=~/no-such-model-dir'"
                                                            " (LexerNoViableAltException): quote a value"),
    (["recipe=qwen3-8b", "model.path=./nope/model.gguf"], "model.path=./nope/model.gguf: no such file"),
    (["model.tokenizer=../no-such-tokenizer"], "model.tokenizer=../no-such-tokenizer: no such file or folder"),
    (["data.sources=[{path_or_id: /no/such/prompts.jsonl, format: prompt, field: prompt}]"],
     "data.sources[0].path_or_id=/no/such/prompts.jsonl: no such file or folder"),
    (["eval.benchmarks=[mine]", "+eval.benchmark_paths.mine=/no/such/bench.jsonl"],
     "eval.benchmark_paths.mine=/no/such/bench.jsonl: no such file or folder"),
])
def test_missing_local_path_is_one_line_before_anything_is_written(tmp_path, run_cli, args, needle):
    run = _guarded_run(tmp_path)
    p = run_cli(*args, f"run_dir={run}")
    assert p.returncode == 2
    assert needle in _error_line(p)
    assert _untouched(run)


def test_missing_model_path_as_a_subprocess(tmp_path):
    run = _guarded_run(tmp_path)
    p = orthrus("recipe=qwen3-8b", "model.path=/nope", f"run_dir={run}", check=False)
    assert p.returncode == 2 and _untouched(run)
    assert _error_line(p).startswith("error: model.path=/nope: no such file or folder") and p.stdout == ""


def test_a_hub_id_is_not_taken_for_a_missing_path(tmp_path):
    assert not preflight.looks_local("Qwen/Qwen3-8B") and not preflight.looks_local("gpt2")
    assert preflight.looks_local("/models/x") and preflight.looks_local("a/b/c") and preflight.looks_local("m.gguf")
    assert preflight.missing("model.path", "Qwen/Qwen3-8B", "x") is None


def _split_gguf(folder, name="Model.Q4_1.gguf"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate((b"GGUF-first-half|", b"second-half")):
        (folder / f"{name}.part{i}").write_bytes(chunk)
    (folder / "README.md").write_text("join the parts")
    return folder / name


def _command_in(line):
    return line.split("`")[1]


def test_split_gguf_says_how_to_join_and_the_command_works(tmp_path):  # as a subprocess, like a user
    run = _guarded_run(tmp_path)
    gguf = _split_gguf(tmp_path / "models")
    p = orthrus("recipe=smollm2-135m", f"model.path={gguf}", f"run_dir={run}", check=False)
    assert p.returncode == 2 and _untouched(run)
    line = _error_line(p)
    assert f"model.path={gguf}: no such file or folder" in line and "Model.Q4_1.gguf.part0, Model.Q4_1.gguf.part1" in line
    cmd = _command_in(line)
    assert cmd == f"cat {gguf}.part0 {gguf}.part1 > {gguf}"
    subprocess.run(cmd, shell=True, check=True)  # the printed command joins the file the recipe reads
    assert gguf.read_bytes() == b"GGUF-first-half|second-half"
    # pointing model.path at a part says the same
    gguf.unlink()
    p = orthrus("recipe=smollm2-135m", f"model.path={gguf}.part1", f"run_dir={run}", check=False)
    assert p.returncode == 2 and "is one part of a split file" in _error_line(p) and _command_in(_error_line(p)) == cmd


def test_split_gguf_in_a_read_only_folder_is_joined_elsewhere(tmp_path, monkeypatch):
    gguf = _split_gguf(tmp_path / "ro")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    line = preflight.missing("model.path", str(gguf), "x")
    assert f"> {tmp_path / gguf.name}`" in line and f"then set model.path={tmp_path / gguf.name}" in line


@pytest.mark.skipif(not (SHARED / "models" / "smollm2-135m-instruct").is_dir(), reason="no ../shared beside the checkout")
def test_shipped_smollm2_recipe_names_its_parts(tmp_path, run_cli):
    gguf = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf.exists():
        pytest.skip("the GGUF is already joined here")
    run = _guarded_run(tmp_path)
    p = run_cli("recipe=smollm2-135m", f"run_dir={run}")
    assert p.returncode == 2 and _untouched(run)
    assert _command_in(_error_line(p)).startswith(f"cat {gguf}.part0 {gguf}.part1 > ")


def test_random_weights_refuse_the_data_stage_before_writing(tmp_path, run_cli):
    run = _guarded_run(tmp_path)
    p = run_cli("recipe=qwen3-8b", "model.init=random", f"run_dir={run}", check=False)
    assert p.returncode == 2 and _untouched(run)
    line = _error_line(p)
    assert "model.init=random with stage=all: the data stage needs real weights" in line and "stage=train" in line


def test_train_without_data_writes_nothing(tmp_path, run_cli):
    run = _guarded_run(tmp_path)
    p = run_cli("stage=train", f"run_dir={run}", check=False)
    assert p.returncode == 2 and _untouched(run)
    assert "run stage=data first" in _error_line(p)


# ----------------------------------------------------------------------------------- own data


OWN = [{"prompt": "Tell me about cats."}, {"prompt": "What is 2+2?"}, {"prompt": "Name a color."},
       {"prompt": "Say hi."}, None, {"prompt": None}, {"text": "no prompt field"}, {"prompt": 5}, "just a string"]


def _own_prompts(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in OWN) + "{not json\n")
    return path


def test_own_prompts_with_skip_keep_the_rejects_and_the_holdout_error_is_one_line(tmp_path, run_cli):
    path = _own_prompts(tmp_path)
    run = tmp_path / "run"
    p = run_cli("recipe=tiny", "stage=data", f"run_dir={run}", "data.on_bad_record=skip",
                f"data.sources=[{{path_or_id: {path}, format: prompt, field: prompt}}]", check=False)
    assert p.returncode != 0
    line = _error_line(p)
    assert line.startswith("error: data.holdout_count=8 leaves no prompt to train on: 4 prompts were selected "
                           "(10 records read, 6 rejected, 0 duplicates); set data.holdout_count to at most 3")
    rejected = [json.loads(x) for x in (run / "data" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["where"].rsplit(" ", 1)[1], r["reason"]) for r in rejected] == [
        ("5", "null_record"), ("6", "null_field"), ("7", "missing_field"), ("8", "wrong_type"), ("9", "wrong_type"),
        ("10", "invalid_json")]
    assert rejected[0]["detail"] == "the record is null; expected a JSON object with the field 'prompt'"
    assert rejected[1]["detail"] == "field 'prompt' is null; expected a value"
    assert "6 rejected records" in p.stdout and str(run / "data" / "rejected.jsonl") in p.stdout
    # with a holdout that fits, the same file runs through the data stage
    run_cli("recipe=tiny", "stage=data", f"run_dir={tmp_path / 'run2'}", "data.on_bad_record=skip",
            "data.holdout_count=1", "data.max_new_tokens=8", f"data.sources=[{{path_or_id: {path}, format: prompt, "
            "field: prompt}]", check=True)
    report = json.loads((tmp_path / "run2" / "data" / "report.json").read_text())
    assert report["rejected"] == 6 and report["holdout"] == 1


def test_a_null_record_is_named_in_raise_mode(tmp_path, run_cli):
    path = tmp_path / "null.jsonl"
    path.write_text('{"prompt": "fine"}\nnull\n')
    p = run_cli("recipe=tiny", "stage=data", f"run_dir={tmp_path / 'run'}",
                f"data.sources=[{{path_or_id: {path}, format: prompt, field: prompt}}]", check=False)
    assert p.returncode != 0
    assert (f"{path} line 2: bad record (null_record): the record is null; expected a JSON object with the field "
            "'prompt'") in _error_line(p)


# ----------------------------------------------------------------------------------- config keys


@pytest.mark.parametrize("arg,owner", [
    ("eval.benchmark_paths.mt_bench=/data/mt_bench.jsonl", "eval.benchmark_paths"),
    ("launcher.env.MY_VAR=1", "launcher.env"),
    ("deepspeed.extra.zero_allow_untested_optimizer=true", "deepspeed.extra"),
])
def test_new_key_of_a_map_says_to_use_plus(tmp_path, run_cli, arg, owner):
    run = _guarded_run(tmp_path)
    p = run_cli("recipe=tiny", arg, f"run_dir={run}")
    assert p.returncode == 2 and _untouched(run)
    line = _error_line(p)
    assert f"{owner} is a map that takes new keys" in line and line.endswith(f": +{arg}")
    # and the suggested override is accepted
    assert run_cli("recipe=tiny", f"+{arg}", "--cfg", "job").returncode == 0


def test_unknown_key_of_a_section_does_not_suggest_plus(tmp_path, run_cli):
    p = run_cli("recipe=tiny", "eval.bogus=1", f"run_dir={tmp_path}")
    assert p.returncode == 2 and "unknown key 'eval.bogus'" in _error_line(p) and "+" not in _error_line(p)


def test_unknown_key_inside_a_data_source_names_the_entry_key(tmp_path, run_cli):
    """A user's own data file with a misspelt source key: the error names that key and the keys a source takes
    (before: "unknown key 'data.sources'", though data.sources is the right key); the right spelling runs."""
    run = _guarded_run(tmp_path)
    own = tmp_path / "my.jsonl"
    own.write_text("".join(json.dumps({"question": f"What is {i} + {i}?"}) + "\n" for i in range(12)))
    p = run_cli("recipe=tiny", f"data.sources=[{{path: {own}, format: prompt, field: question}}]", f"run_dir={run}")
    assert p.returncode == 2 and _untouched(run)
    assert _error_line(p) == ("error: data.sources: unknown key 'path' in one of its entries; an entry takes "
                              "path_or_id, format, field, response_field, weight, max_samples, split, subset")
    ok = run_cli("recipe=tiny", f"data.sources=[{{path_or_id: {own}, format: prompt, field: question}}]", "--cfg", "job")
    assert ok.returncode == 0 and str(own) in ok.stdout


@pytest.mark.parametrize("override,message", [
    ("data.compile_steps=maybe", "error: data.compile_steps: 'maybe' is not one of auto, true, false"),
    ("eval.compile_min_steps=-1", "error: eval.compile_min_steps: must be >= 0, got -1"),
    ("train.offset_decay=-0.5", "train.offset_decay must be a finite number >= 0"),
])
def test_bad_compile_and_loss_settings_are_one_line(tmp_path, override, message):
    run = tmp_path / "run"
    p = orthrus("recipe=tiny", f"run_dir={run}", override, check=False, timeout=300)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not run.exists()  # nothing written


def test_an_unreachable_hub_id_is_one_line(tmp_path, run_cli, monkeypatch):
    """A model.path that is no local path is taken for a Hub id; where the Hub cannot provide it (offline, here
    HF_HUB_OFFLINE=1; a typo) transformers raised a several-line OSError from the tokenizer load as a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = run_cli("recipe=tiny", "model.path=no-such-org/no-such-model", "stage=data", f"run_dir={tmp_path / 'run'}")
    assert p.returncode != 0
    line = _error_line(p)
    assert "could not read a tokenizer from 'no-such-org/no-such-model'" in line and "set model.path to" in line
    assert "HF_HUB_OFFLINE=1" in line


def test_an_unreachable_hub_id_for_the_heads_stops_before_the_data_stage(tmp_path, run_cli, monkeypatch):
    """heads.init_from as a Hub id the Hub cannot give here is refused before any stage runs (it was read only
    by the train stage, after a data stage that takes hours on a real model), with one line saying what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    p = run_cli("recipe=tiny", "heads.init_from=no-such-org/no-such-heads", f"run_dir={run}")
    assert p.returncode == 2
    line = _error_line(p)
    assert line.startswith("error: heads.init_from=no-such-org/no-such-heads: not a local folder, and the Hub does "
                           "not give it here") and "huggingface-cli download no-such-org/no-such-heads" in line
    assert not run.exists()


# ----------------------------------------------------------------------------------- values, paths, run folders


@pytest.mark.parametrize("override,message", [
    ("train.lr=-1", "error: train.lr must be a finite number >= 0 (0: the heads stay as initialised), got -1.0"),  # was a torch traceback after the data stage
    ("train.epochs=-1", "error: train.epochs must be a finite number > 0"),  # was one silent training step
    ("train.temperature=0", "error: train.temperature must be a finite number > 0, got 0.0"),
    ("train.warmup_ratio=2", "error: train.warmup_ratio must be a finite number in [0, 1], got 2.0"),
    ("train.keep_checkpoints=-1", "error: train.keep_checkpoints must be a finite number >= 0"),
    ("train.betas=[0.9,1.5]", "error: train.betas must be two values in [0, 1), got [0.9, 1.5]"),
    # a misspelt section is an unknown key, not "an unknown key in one of its entries"
    ("trian.max_steps=3", "error: unknown key 'trian.max_steps': it is not in the schema"),
])
def test_bad_training_value_is_one_line_before_anything_is_written(tmp_path, run_cli, override, message):
    run = _guarded_run(tmp_path)
    p = run_cli("recipe=tiny", override, f"run_dir={run}")
    assert p.returncode == 2 and _untouched(run)
    assert _error_line(p).startswith(message), p.stderr


def test_run_dir_that_is_a_file_is_one_line(tmp_path, run_cli):
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    for run_dir in (f, f / "sub"):
        p = run_cli("recipe=tiny", f"run_dir={run_dir}")
        assert p.returncode == 2 and f.read_text() == "precious"
        assert _error_line(p) == (f"error: run_dir={run_dir}: {f} is a file, not a folder; set run_dir to a new folder "
                                  "or to the folder of an earlier run")


def test_a_csv_source_is_refused_before_anything_is_written(tmp_path, run_cli):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\nSay hi.\n")
    run = _guarded_run(tmp_path)
    p = run_cli("recipe=tiny", f"data.sources=[{{path_or_id: {csv}, format: prompt, field: prompt}}]", f"run_dir={run}")
    assert p.returncode == 2 and _untouched(run)
    assert _error_line(p).startswith(f"error: data.sources[0].path_or_id={csv}: unknown file type; convert it to "
                                     "one of .jsonl, ")


def test_a_folder_that_holds_the_model_is_not_taken_for_it(tmp_path, run_cli):
    """model.path at the folder above the model (or any folder without config.json) raised transformers' tokenizer
    ValueError as a traceback in the data stage; now one line names the model folder inside it."""
    models = tmp_path / "models"
    (models / "my-qwen").mkdir(parents=True)
    (models / "my-qwen" / "config.json").write_text("{}")
    run = _guarded_run(tmp_path)
    p = run_cli("recipe=tiny", f"model.path={models}", f"run_dir={run}")
    assert p.returncode == 2 and _untouched(run)
    assert "no config.json in this folder" in _error_line(p) and "(my-qwen)" in _error_line(p)
    p = run_cli("recipe=tiny", f"model.path={models / 'my-qwen' / 'config.json'}", f"run_dir={run}")
    assert p.returncode == 2 and "a file that is not a .gguf" in _error_line(p) and _untouched(run)


def test_resume_from_a_missing_checkpoint_is_one_line(tmp_path, run_cli):
    run = _guarded_run(tmp_path)
    (run / "data" / "train").mkdir(parents=True)
    p = run_cli("recipe=tiny", "stage=train", "resume=/no/such/step-00000020", f"run_dir={run}")
    assert p.returncode == 2  # was a ValueError traceback from the trainer
    assert _error_line(p).startswith("error: resume=/no/such/step-00000020: not a complete checkpoint folder")
    assert sorted(x.name for x in run.iterdir()) == ["data", "keep.txt"]


@pytest.mark.parametrize("stage", ["eval", "export"])
def test_eval_or_export_before_training_writes_nothing(tmp_path, run_cli, stage):
    run = _guarded_run(tmp_path)
    p = run_cli("recipe=tiny", f"stage={stage}", f"run_dir={run}")
    assert p.returncode == 2 and _untouched(run)  # was exit 1 after writing config.yaml, with no "error:"
    assert _error_line(p).startswith(f"error: stage={stage}: no complete checkpoint in {run / 'checkpoints'}; "
                                     "run stage=train first")


def _trained(run, step=20, head_type="orthrus"):
    """What preflight reads of a finished training: checkpoints/latest and that checkpoint's COMPLETE and
    trainer_state.json (written by train/checkpoint.save, head_type included)."""
    ck = run / "checkpoints" / f"step-{step:08d}"
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text("ok\n")
    (ck / "trainer_state.json").write_text(json.dumps({"step": step, "head_type": head_type, "block_size": 8}))
    (run / "checkpoints" / "latest").write_text(ck.name + "\n")
    (run / "data" / "train").mkdir(parents=True)
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.mark.parametrize("stage", ["all", "train", "eval"])
def test_other_heads_type_in_a_trained_run_folder_is_one_line(tmp_path, run_cli, stage):
    """heads.type=medusa in a folder that trained Orthrus heads: 'train: complete, skipped' and then a ValueError
    traceback from the eval, or (more steps) a DeepSpeed traceback resuming the Orthrus optimizer state."""
    run = _guarded_run(tmp_path)
    before = _trained(run)
    p = run_cli("recipe=tiny", f"stage={stage}", "heads.type=medusa", "train.max_steps=30", f"run_dir={run}")
    assert p.returncode == 2 and sorted(str(x.relative_to(run)) for x in run.rglob("*")) == before
    assert _error_line(p) == (f"error: heads.type=medusa, but {run / 'checkpoints' / 'step-00000020'} holds orthrus "
                              "heads (this run folder trained heads.type=orthrus); use a new run_dir for medusa heads")


def test_resume_never_over_earlier_checkpoints_is_refused(tmp_path, run_cli):
    """resume=never in a folder with checkpoints at higher steps: each new checkpoint was pruned (by step) as soon
    as it was written, `latest` named a deleted folder, and the eval then read the earlier training's heads."""
    run = _guarded_run(tmp_path)
    before = _trained(run)
    p = run_cli("recipe=tiny", "stage=train", "resume=never", "train.max_steps=6", f"run_dir={run}")
    assert p.returncode == 2 and sorted(str(x.relative_to(run)) for x in run.rglob("*")) == before
    assert _error_line(p).startswith(f"error: resume=never: {run / 'checkpoints'} already holds step-00000020 of an "
                                     "earlier training; use a new run_dir")
