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
