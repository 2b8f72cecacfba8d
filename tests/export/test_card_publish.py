"""Model card contents and publish() against a recorder standing in for HfApi (no network)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from orthrus_export_testlib import MASK_ID, tiny_tokenizer

from orthrus_train.export import PublishError, export_folder, publish
from orthrus_train.export.card import lossless_verdict

EVAL_OK = {  # the shape orthrus_train.eval.report.run_eval writes
    "model": {"head_type": "orthrus", "block_size": 4},
    "recipe": "tiny",
    "definitions": {"acceptance_length": "emitted tokens / verify passes (from the report)",
                    "tpf": "emitted tokens / (draft passes + verify passes), prefill excluded (from the report)"},
    "notes": ["tiny model: these numbers only show that the machinery works"],
    "benchmarks": {
        "gsm8k": {"results": {"0.0": {"spec": {"prompts": 64, "acceptance_length": 3.1234, "tpf": 1.61,
                                               "tpf_std": 0.2, "tokens_per_s": 812.5}, "speedup": 2.05}}},
        "humaneval": {"results": {"0.0": {"spec": {"prompts": 64, "acceptance_length": 3.5, "tpf": 1.8,
                                                   "tpf_std": 0.1, "tokens_per_s": 900.0}, "speedup": 2.3}}},
    },
    "warnings": [],
    "lossless": {"passed": True, "greedy": {"passed": True, "match_rate": 1.0, "non_tie_divergences": 0},
                 "ks": {"passed": True, "p_value": 0.43, "tokens": 4096}},
    "plots": ["tpf.png"],
}


def _run_dir(root, eval_report=EVAL_OK, plots=True):
    """A run folder laid out as orthrus_train.run_dir describes it."""
    run = root / "run"
    (run / "eval").mkdir(parents=True)
    (run / "data").mkdir()
    if eval_report is not None:
        (run / "eval" / "report.json").write_text(json.dumps(eval_report))
    (run / "data" / "report.json").write_text(json.dumps({"examples": 1234, "sources": ["gsm8k", "codealpaca"]}))
    (run / "train_summary.json").write_text(json.dumps({"final": {"tokens": 1_000_000, "wall_time_s": 5400}}))
    (run / "config.yaml").write_text("recipe: tiny\ntrain:\n  lr: 0.0003\n")
    if plots:
        (run / "eval" / "tpf.png").write_bytes(b"\x89PNG fake")
    return run


def _export(root, exported, run_dir=None, tokenizer=None, **extra):
    _, config, sd, _ = exported["llama"]
    return export_folder(
        sd,
        config,
        tokenizer,
        root / "export",
        block_size=4,
        mask_token_id=MASK_ID,
        base_model_id="meta-llama/Tiny",
        base_revision="abc123",
        run_dir=run_dir,
        extra_card_info=extra,
    )


def test_card_reports_what_the_run_recorded(tmp_path, exported):
    run = _run_dir(tmp_path)
    folder = _export(tmp_path, exported, run, tokenizer=tiny_tokenizer(), license="llama3.2", repo_id="me/orthrus-tiny")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: meta-llama/Tiny" in card and "license: llama3.2" in card
    assert "| base revision | abc123 |" in card and "| block size K | 4 |" in card
    assert "| tokenizer | included |" in card
    assert "| gsm8k | 0.0 | 64 | 3.123 | 1.61 | 0.2 | 812.5 | 2.05 |" in card  # from eval/report.json
    assert "emitted tokens / verify passes (from the report)" in card  # definitions printed verbatim
    assert "**PASSED** (lossless.passed = True)" in card and "* `ks`: **pass**; p_value = 0.43" in card
    assert "> **Note:** tiny model" in card
    assert '"examples": 1234' in card and '"wall_time_s": 5400' in card and "lr: 0.0003" in card
    assert "Recipe: `tiny`" in card and 'from_pretrained("me/orthrus-tiny", trust_remote_code=True' in card
    assert "![tpf](plots/tpf.png)" in card and (folder / "plots" / "tpf.png").exists()
    assert "_missing" not in card


def test_caller_values_win_over_the_run_folder(tmp_path, exported):
    folder = _export(tmp_path, exported, _run_dir(tmp_path), recipe="recipes/llama_tiny.yaml",
                     config={"lr": 1e-3}, training={"tokens": 42})
    card = (folder / "README.md").read_text()
    assert "Recipe: `recipes/llama_tiny.yaml`" in card and "lr: 0.001" in card and '"tokens": 42' in card


def test_card_states_missing_inputs(tmp_path, exported):
    card = (_export(tmp_path, exported) / "README.md").read_text()
    assert "license:" not in card.split("---")[1]  # no invented license in the metadata
    for missing in (
        "use the base model's tokenizer",
        "the recipe name",
        "the resolved config",
        "no data/report.json",
        "no eval/report.json",
        "training tokens/time",
        "no plots",
        "license was not provided",
    ):
        assert missing in card, missing


def test_lossless_verdicts():
    assert lossless_verdict({"lossless": {"passed": False}})[0] is False
    assert lossless_verdict({"lossless": {"status": "pass"}})[0] is True
    assert lossless_verdict({"lossless": True})[0] is True
    assert lossless_verdict({"results": []})[0] is None
    assert lossless_verdict(None)[0] is None


class Recorder:
    """Stands in for huggingface_hub.HfApi: records calls, snapshots the uploaded folder."""

    endpoint = "https://hub.example"

    def __init__(self, fail_with=None):
        self.calls, self.uploaded, self.fail_with = [], None, fail_with

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        self.uploaded = sorted(
            p.relative_to(kw["folder_path"]).as_posix()
            for p in __import__("pathlib").Path(kw["folder_path"]).rglob("*")
            if p.is_file()
        )

        class Info:
            oid = "c0ffee"

        return Info()

    def create_tag(self, repo_id, **kw):
        self.calls.append(("create_tag", repo_id, kw))


def test_publish_uploads_and_tags(tmp_path, exported, capsys):
    folder = _export(tmp_path, exported, _run_dir(tmp_path))
    api = Recorder()
    result = publish(folder, "me/orthrus-tiny", private=True, revision_tag="v1", api=api)
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "upload_folder", "create_tag"]
    assert api.calls[0][2] == {"private": True, "repo_type": "model", "exist_ok": True}
    assert api.calls[2][2]["tag"] == "v1" and api.calls[2][2]["revision"] == "c0ffee"
    assert {
        "config.json",
        "model.safetensors",
        "modeling_orthrus.py",
        "README.md",
        "generation_config.json",
        "plots/tpf.png",
    } <= set(api.uploaded)
    assert result["url"] == "https://hub.example/me/orthrus-tiny/tree/v1"
    assert "https://hub.example/me/orthrus-tiny/tree/v1" in capsys.readouterr().out


def test_publish_dry_run_lists_files_and_uploads_nothing(tmp_path, exported, capsys):
    folder = _export(tmp_path, exported, _run_dir(tmp_path))
    api = Recorder()
    result = publish(folder, "me/x", dry_run=True, api=api)
    out = capsys.readouterr().out
    assert api.calls == []
    size = (folder / "model.safetensors").stat().st_size
    assert f"{size:,}" in out and "model.safetensors" in out and "total" in out
    assert dict(result["files"])["model.safetensors"] == size


@pytest.mark.parametrize(
    "report,why",
    [
        (None, "does not exist"),
        ({"lossless": {"passed": False}}, "lossless check failed"),
        ({"results": []}, "has no verdict"),
    ],
)
def test_publish_refuses_without_a_passing_lossless_eval(tmp_path, exported, report, why):
    folder = _export(tmp_path, exported, _run_dir(tmp_path, eval_report=report))
    api = Recorder()
    with pytest.raises(PublishError, match=why + r".*force=True"):
        publish(folder, "me/x", api=api)
    assert api.calls == []
    assert publish(folder, "me/x", api=api, force=True)["eval"].startswith("publishing despite")
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]


def test_publish_refuses_an_invalid_folder(tmp_path, exported):
    folder = _export(tmp_path, exported, _run_dir(tmp_path))
    (folder / "modeling_orthrus.py").unlink()
    with pytest.raises(ValueError, match="modeling_orthrus.py is missing"):
        publish(folder, "me/x", api=Recorder(), force=True)


def test_publish_errors_never_show_the_token(tmp_path, exported, monkeypatch):
    token = "hf_SuperSecretToken1234567890"
    monkeypatch.setenv("HF_TOKEN", token)
    folder = _export(tmp_path, exported, _run_dir(tmp_path))
    api = Recorder(fail_with=f"401 Unauthorized for token {token} (Authorization: Bearer {token})")
    with pytest.raises(PublishError) as info:
        publish(folder, "me/x", api=api)
    assert token not in str(info.value) and "SuperSecret" not in str(info.value)
    assert "401 Unauthorized" in str(info.value) and info.value.__cause__ is None and info.value.__suppress_context__
    shutil.rmtree(folder)


# ------------------------------------------------------------------------------- base model, snippet, token


def test_card_never_publishes_a_local_path_as_base_model(tmp_path, exported):
    _, config, sd, _ = exported["llama"]
    base = tmp_path / "models" / "my-finetuned-llama"
    folder = export_folder(sd, config, None, tmp_path / "export", block_size=4, mask_token_id=MASK_ID,
                           base_model_id=str(base))
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model" not in front and str(base) not in card
    assert "| base model | local model `my-finetuned-llama`" in card and "export.base_model_id" in card
    assert "base revision" not in card  # unknown: no line, no placeholder
    assert "# Orthrus draft heads for my-finetuned-llama" in card


def test_card_takes_a_hub_id_from_the_backbone_config(tmp_path, exported):
    import copy

    _, config, sd, _ = exported["llama"]
    config = copy.deepcopy(config)
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    folder = export_folder(sd, config, None, tmp_path / "export", block_size=4, mask_token_id=MASK_ID,
                           base_model_id=str(tmp_path / "local" / "SmolLM2.gguf"))
    card = (folder / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card.split("---")[1]
    assert str(tmp_path) not in card


def test_card_tokenizer_line_runs_without_asking_for_custom_code(tmp_path, exported):
    folder = _export(tmp_path, exported, tokenizer=tiny_tokenizer())
    card = (folder / "README.md").read_text()
    line = next(x for x in card.splitlines() if "AutoTokenizer.from_pretrained(" in x)
    code = "from transformers import AutoTokenizer\n" + line.replace("<path-or-repo-id>", str(folder)) + \
        "\nprint('ids', tok('t5 t6').input_ids)"
    p = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 0, p.stderr
    assert "ids [5, 6]" in p.stdout
    assert "custom code" not in p.stdout + p.stderr and "trust_remote_code" not in p.stdout + p.stderr


def test_cli_publish_without_a_token_says_where_one_is_read_from(tmp_path, exported):
    run = _run_dir(tmp_path)
    shutil.copytree(exported["llama"][3], run / "export")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")  # no network call is made either way
    p = subprocess.run([sys.executable, "-m", "orthrus_train", "stage=publish", f"run_dir={run}", "hub.repo_id=me/x"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    line = next(x for x in p.stderr.splitlines() if x.startswith("error: "))
    assert line.startswith("error: no Hugging Face token found") and "HF_TOKEN" in line and "hf auth login" in line
    assert str(tmp_path / "hf-home" / "token") in line  # where the stored login is read from
    assert "Error" not in line  # no network error in its place
