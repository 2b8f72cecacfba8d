"""Model card (README.md) for an Orthrus export folder.

Everything in the card comes from the caller or from the run folder (``orthrus_train.run_dir``): the eval
report written by ``orthrus_train.eval.report``, the data report, the training summary, the resolved config.
An input that is absent is written as missing, never filled in. Metric definitions are printed verbatim from
the eval report (or ``orthrus_train.eval.metrics.DEFINITIONS``, their one home).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..eval.metrics import DEFINITIONS
from ..run_dir import RunDir

PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")
MISSING = "_missing: {what} was not provided to the exporter._"


def read_json(path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def run_folder_inputs(run_dir) -> dict:
    """What the card takes from a run folder: eval/data reports, training summary, resolved config, plot files."""
    if run_dir is None:
        return {"eval_report": None, "data_report": None, "training": None, "config": None, "plot_files": []}
    run = RunDir(Path(run_dir))
    plots = sorted(p for folder in (run.eval, run.eval / "plots") if folder.is_dir() for p in folder.iterdir()
                   if p.suffix.lower() in PLOT_SUFFIXES)
    return {"eval_report": read_json(run.eval_report), "data_report": read_json(run.data_report),
            "training": read_json(run.train_summary),
            "config": run.config.read_text() if run.config.exists() else None, "plot_files": plots}


def lossless_verdict(report: dict | None) -> tuple[bool | None, str]:
    """(passed, why) from an eval report's `lossless` section; passed is None when there is no verdict."""
    if report is None:
        return None, "no eval report"
    section = report.get("lossless")
    if section is None:
        return None, "the eval report has no 'lossless' section"
    if isinstance(section, bool):
        return section, f"lossless = {section}"
    if isinstance(section, dict):
        for key in ("passed", "pass", "ok"):
            if isinstance(section.get(key), bool):
                return section[key], f"lossless.{key} = {section[key]}"
        status = str(section.get("status", "")).lower()
        if status in ("pass", "passed", "ok"):
            return True, f"lossless.status = {section['status']}"
        if status in ("fail", "failed", "error"):
            return False, f"lossless.status = {section['status']}"
    return None, "the 'lossless' section has no passed/ok/status verdict"


def base_model_ref(*candidates: str | None) -> tuple[str | None, str | None]:
    """(Hub id, local name) of the base model from candidates in order of preference (export.base_model_id,
    model.path, the backbone config's `_name_or_path`): the first that is a Hub id wins; a local path is never
    published as `base_model`, only its folder or file name is kept for the card's text."""
    from ..config.preflight import is_hub_id

    local = None
    for c in candidates:
        if not c:
            continue
        if is_hub_id(c):
            return c, None
        local = local or Path(str(c).rstrip("/")).name
    return None, local


def _json_block(obj) -> str:
    return "```json\n" + json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n```"


def _config_block(config) -> str:
    if isinstance(config, str):
        return "```yaml\n" + config.strip() + "\n```"
    try:
        import yaml

        return "```yaml\n" + yaml.safe_dump(config, sort_keys=False).strip() + "\n```"
    except ImportError:
        return _json_block(config)


def _table(rows: list[dict]) -> str:
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def _eval_rows(report: dict) -> list[dict]:
    """One row per benchmark x temperature from the eval stage's report (benchmarks.<name>.results.<T>.spec)."""
    rows = []
    for name, bench in (report.get("benchmarks") or {}).items():
        for temp, cell in (bench.get("results") or {}).items():
            spec = cell.get("spec", {})
            rows.append({"benchmark": name, "temperature": temp, "prompts": spec.get("prompts"),
                         "acceptance length": spec.get("acceptance_length"), "TPF": spec.get("tpf"),
                         "TPF std": spec.get("tpf_std"), "tok/s": spec.get("tokens_per_s"),
                         "speedup vs AR": cell.get("speedup")})
    return rows


def _lossless_lines(section) -> list[str]:
    """One line per sub-check (greedy, ks, chi_square, ...): its verdict and scalar numbers."""
    if not isinstance(section, dict):
        return []
    lines = []
    for check, detail in section.items():
        if isinstance(detail, dict):
            numbers = ", ".join(f"{k} = {_fmt(v)}" for k, v in detail.items()
                                if k != "passed" and isinstance(v, (int, float, str, bool)))
            verdict = {True: "pass", False: "FAIL"}.get(detail.get("passed"), "-")
            lines.append(f"* `{check}`: **{verdict}**; {numbers}")
    return lines


def _eval_section(report: dict | None) -> str:
    out = ["## Evaluation", ""]
    if report is None:
        out += ["_missing: the run folder has no eval/report.json; no evaluation results are reported._", ""]
    else:
        out += [f"> **Note:** {n}" for n in report.get("notes", [])]
        rows = _eval_rows(report)
        if rows:
            out += ["", _table(rows)]
        else:
            out += ["The eval report has no benchmark results; its content:", "",
                    _json_block({k: v for k, v in report.items() if k != "lossless"})]
        out += [f"* warning: {w}" for w in report.get("warnings", [])]
        passed, why = lossless_verdict(report)
        verdict = {True: "PASSED", False: "FAILED", None: "no verdict"}[passed]
        out += ["", "### Lossless checks", "", f"**{verdict}** ({why}): Orthrus decoding must reproduce the base "
                "model's output distribution (greedy: token for token).", ""] + _lossless_lines(report.get("lossless"))
    definitions = (report or {}).get("definitions") or DEFINITIONS
    out += ["", "Metric definitions" + (" (from the eval report):" if report else ":"), ""]
    out += [f"* **{name}**: {text}" for name, text in definitions.items()]
    return "\n".join(out)


def _usage(repo: str, layout: str, base: str | None) -> str:
    base_note = (
        f"# heads-only: the base model ({base}) is fetched and its weights are checked against the recorded sha256\n"
        if layout == "heads"
        else ""
    )
    return f"""```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

{base_note}tok = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=False)  # a standard tokenizer: no custom code
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True, dtype=torch.bfloat16, device_map="cuda")
text = tok.apply_chat_template([{{"role": "user", "content": "Write a haiku about GPUs."}}], tokenize=False,
                               add_generation_prompt=True)
ids = tok(text, return_tensors="pt").input_ids.to(model.device)
out = model.generate(ids, max_new_tokens=256, use_diffusion_mode=True)  # greedy by default: lossless
print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
# model.generate(ids, ..., temperature=0.7, top_k=20, top_p=0.8) samples with rejection sampling;
# use_diffusion_mode=False runs plain autoregressive decoding of the base model.
```"""


def build_card(info: dict) -> str:
    """Render README.md. `info` keys: base_model (a Hub id), base_model_local (the folder or file name of a local
    base model, when there is no Hub id), base_revision, license, layout, backbone_model_type, block_size,
    mask_token_id, dtype, num_twin_params, num_params, base_sha256, tokenizer_included, recipe, config, data_report,
    training, eval_report, plots, repo_id, title."""
    base, layout = info.get("base_model"), info["layout"]
    front = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- orthrus",
        "- speculative-decoding",
        "- diffusion-drafting",
    ]
    if base:
        front.append(f"base_model: {base}")
    if info.get("license"):
        front.append(f"license: {info['license']}")
    front.append("---")
    local = info.get("base_model_local")
    facts = [
        ("base model", base or (f"local model `{local}` (not a Hub id; export.base_model_id=ORG/NAME names it)"
                                if local else "_missing_")),
    ]
    if info.get("base_revision"):  # unknown for a local folder: no line rather than a placeholder
        facts.append(("base revision", info["base_revision"]))
    facts += [
        ("backbone family", info["backbone_model_type"]),
        ("layout", layout),
        ("block size K", info["block_size"]),
        ("mask token id", info["mask_token_id"]),
        ("weights dtype", info.get("dtype")),
        ("twin (draft) parameters", f"{info.get('num_twin_params', 0):,}"),
        (
            "tokenizer",
            (
                "included"
                if info.get("tokenizer_included")
                else "_missing: not exported with this folder; use the base model's tokenizer_"
            ),
        ),
    ]
    if info.get("num_params"):
        facts.append(("total parameters", f"{info['num_params']:,}"))
    if info.get("base_sha256"):
        facts.append(("base weights sha256", f"`{info['base_sha256']}`"))
    title = info.get("title") or f"Orthrus draft heads for {base or local or 'an unnamed base model'}"
    parts = [
        "\n".join(front),
        f"# {title}",
        "",
        "Orthrus (arXiv 2605.12825) adds twin attention projections (`*_diff`) to every layer of a frozen causal LM. "
        "They draft a block of tokens in one bidirectional pass over the base model's own KV cache; one causal pass of "
        "the unchanged base model then verifies them, so greedy output is identical to the base model's.",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
    ] + [f"| {k} | {v} |" for k, v in facts]
    parts += ["", "## Usage", "", _usage(info.get("repo_id") or "<path-or-repo-id>", layout, base or local)]
    parts += ["", "## Training recipe", ""]
    parts.append(f"Recipe: `{info['recipe']}`" if info.get("recipe") else MISSING.format(what="the recipe name"))
    parts += [
        "",
        "Resolved config:",
        "",
        _config_block(info["config"]) if info.get("config") else MISSING.format(what="the resolved config"),
    ]
    parts += [
        "",
        "## Data",
        "",
        (
            _json_block(info["data_report"])
            if info.get("data_report")
            else "_missing: the run folder has no data/report.json._"
        ),
    ]
    parts += [
        "",
        "## Training",
        "",
        (
            _json_block(info["training"])
            if info.get("training")
            else MISSING.format(what="training tokens/time (no train report)")
        ),
    ]
    parts += ["", _eval_section(info.get("eval_report"))]
    plots = info.get("plots") or []
    parts += ["", "## Plots", ""] + (
        [f"![{Path(p).stem}]({p})" for p in plots] or ["_missing: no plots in the run folder._"]
    )
    parts += [
        "",
        "## License",
        "",
        (
            f"The weights follow the base model's license: **{info['license']}**."
            if info.get("license")
            else "_missing: the base model's license was not provided; check the base model's "
            "card before redistributing._"
        ),
        "",
    ]
    return "\n".join(parts)
