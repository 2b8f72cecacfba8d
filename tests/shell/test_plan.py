"""stage=plan through the CLI: tokens, steps and hours of a recipe on N GPUs of a kind, from the throughput
recorded in orthrus_train/plan/throughput.json; loads no model, writes nothing."""
import json
import math
import re

import pytest

from orthrus_train.plan import THROUGHPUT
from tests.conftest import SHARED, orthrus

REC = json.loads(THROUGHPUT.read_text())


def _plan(*args, check=True):
    return orthrus("stage=plan", *args, check=check, env={"HF_HUB_OFFLINE": "1"})


def _json(*args):
    p = _plan(*args, "plan.format=json")
    assert "Loading" not in p.stdout + p.stderr
    return json.loads(p.stdout)


def _measured(shape, gpu, world, kind="training"):
    """The newest recorded measurement of `kind` for (shape, gpu, world) (a re-measurement replaces the older)."""
    return [e for e in REC[kind] if (e["shape"], e["gpu"], e.get("world", 1)) == (shape, gpu, world)][-1]


def test_qwen3_8b_on_8_h200_uses_the_recorded_measurement(tmp_path):
    pl = _json("recipe=qwen3-8b", "plan.gpus=8", "plan.gpu=h200", f"run_dir={tmp_path / 'r'}")
    assert not (tmp_path / "r").exists()  # writes nothing
    # data and steps follow the recipe: 510K prompts - 300 held out, 304 + 688 tokens each, 2048-token rows
    assert pl["documents"] == 510_000 - 300
    assert pl["data_tokens"] == pl["documents"] * (304 + 688)
    assert pl["regenerated_tokens"] == (pl["documents"] + 300) * 688  # the held-out prompts answered once each
    rows = pl["data_tokens"] // 2048
    assert pl["rows"] == rows and pl["steps_per_epoch"] == rows // 128 and pl["steps"] == 2 * (rows // 128)
    assert pl["train_tokens"] == pl["steps"] * 128 * 2048
    # training: qwen3-8b measured on 4 H200s (ZeRO-3), the nearest GPU count; its efficiency kept for 8
    per_gpu = _measured("qwen3-8b", "h200", 4)["tokens_per_s"] / 4
    assert pl["training"]["tokens_per_s_per_gpu"] == pytest.approx(per_gpu)
    assert pl["training"]["hours"] == pytest.approx(pl["train_tokens"] / (per_gpu * 8) / 3600)
    basis = pl["training"]["basis"]
    assert "from qwen3-8b on 4 x h200 ZeRO-3, 2026-11-22, commit ea5ecee" in basis
    assert "no 8-GPU measurement" in basis and "no qwen3-8b measurement" not in basis
    # regeneration: no 8B measurement: carried from the SmolLM2 engine measurement on the H200 by parameters, said so
    r = pl["regeneration"]
    assert r["extrapolated"] and "scaled from smollm2-135m by decode parameters" in r["basis"]
    # ... from the SmolLM2 / H200 measurement nearest the planned 8 GPUs (the 2-GPU one of session 8), not from
    # the single-GPU ones
    two = _measured("smollm2-135m", "h200", 2, "regeneration")
    one_gpu = [e for e in REC["regeneration"] if (e["shape"], e["gpu"], e["world"]) == ("smollm2-135m", "h200", 1)]
    assert f"from smollm2-135m on 2 x h200, {two['date']}, commit {two['commit']}" in r["basis"]
    assert not any(f"commit {e['commit']}" in r["basis"] for e in one_gpu)
    assert r["hours"] == pytest.approx(pl["regenerated_tokens"] / (r["tokens_per_s_per_gpu"] * 8) / 3600)
    assert pl["total_hours"] == pytest.approx(r["hours"] + pl["training"]["hours"])


def test_more_gpus_is_faster_and_a_measured_world_size_is_used_as_measured():
    # as measured: ZeRO-3, eager norms (train.compile_norm_rope defaults to true; 8B was measured without it)
    z3 = ("recipe=qwen3-8b", "deepspeed=zero3", "plan.gpu=h200", "train.compile_norm_rope=false")
    one, two, four = (_json(*z3, f"plan.gpus={n}") for n in (1, 2, 4))
    for n, pl in ((1, one), (2, two), (4, four)):
        measured = _measured("qwen3-8b", "h200", n)["tokens_per_s"]
        assert pl["training"]["tokens_per_s_per_gpu"] * n == pytest.approx(measured)
        assert not pl["training"]["extrapolated"] and pl["training"]["basis"].startswith("measured")
    assert one["training"]["hours"] > two["training"]["hours"] > four["training"]["hours"] > 0
    # regeneration scales linearly from the measurement nearest the GPU count (one GPU: a 1-GPU measurement; two
    # and four: the 2-GPU one): each plan's rate is its reference's per-GPU rate x GPUs
    r1, r2, r4 = (pl["regeneration"]["tokens_per_s_per_gpu"] for pl in (one, two, four))
    assert r2 == pytest.approx(r4) and r1 != pytest.approx(r2)
    assert two["regeneration"]["hours"] == pytest.approx(2 * four["regeneration"]["hours"])
    assert one["regeneration"]["hours"] > two["regeneration"]["hours"]


def test_unmeasured_shape_is_extrapolated_and_says_from_what():
    p = _plan("recipe=qwen3-14b", "plan.gpu=h100", "plan.gpus=16")
    out = p.stdout
    for needle in ("plan: recipe qwen3-14b", "optimizer steps", "regeneration:", "training:", "total:",
                   "no qwen3-14b measurement: scaled from qwen3-8b by FLOPs per token"):
        assert needle in out, out
    per_gpu = float(re.search(r"training: +([\d,]+) tok/s/GPU", out).group(1).replace(",", ""))
    ref = _measured("qwen3-8b", "h100", 1)["tokens_per_s"]
    assert 0.3 * ref < per_gpu < 0.74 * ref  # 14B: fewer tokens/s than 8B, at 16 GPUs' efficiency


def test_72b_plans_without_a_checkpoint():
    pl = _json("recipe=qwen3-72b")  # model.path is unset: the plan needs only the shape
    assert pl["gpus"] == 64 and pl["gpu"] == "h200"
    assert "from qwen3-72b on 4 x h200 ZeRO-3" in pl["training"]["basis"]
    per_gpu_at_4 = _measured("qwen3-72b", "h200", 4)["tokens_per_s"] / 4
    assert pl["training"]["tokens_per_s_per_gpu"] == pytest.approx(per_gpu_at_4)  # 4 GPUs' efficiency kept


def test_shape_from_config_json_and_prompts_from_plan():
    pl = _json("recipe=tiny", "plan.prompts=1000", "plan.gpus=1", "plan.gpu=h100", "plan.response_tokens=50",
               "plan.prompt_tokens=20")
    assert pl["shape"] == "qwen3" and pl["documents"] == 1000 - 8 and pl["data_tokens"] == (1000 - 8) * 70
    assert math.isfinite(pl["total_hours"]) and pl["training"]["extrapolated"]
    # regeneration answers the 8 held-out prompts too (once each: their rows are data/val)
    assert pl["regenerated_tokens"] == (1000 - 8 + 8) * 50
    frac = _json("recipe=tiny", "plan.prompts=1000", "plan.gpus=1", "plan.gpu=h100", "plan.response_tokens=50",
                 "data.holdout_count=null", "data.holdout_fraction=0.1", "data.samples_per_prompt=3")
    assert frac["holdout"] == 100 and frac["documents"] == 900 * 3 and frac["regenerated_tokens"] == (2700 + 100) * 50
    # self-written prompts (data.self_prompts): answered like the others, and written first (prompt length each,
    # capped by their max_tokens); the text view names them
    sp = _json("recipe=tiny", "plan.prompts=1000", "plan.gpus=1", "plan.gpu=h100", "plan.response_tokens=50",
               "plan.prompt_tokens=20", "data.self_prompts.count=500", "data.self_prompts.max_tokens=16",
               "data.samples_per_prompt=2")
    assert sp["self_prompts"] == 500 and sp["documents"] == (992 + 500) * 2
    assert sp["regenerated_tokens"] == (1984 + 1000 + 8) * 50 + 500 * 16
    assert sp["regeneration"]["hours"] > pl["regeneration"]["hours"]
    text = orthrus("stage=plan", "recipe=tiny", "plan.prompts=1000", "plan.gpus=1", "plan.gpu=h100",
                   "data.self_prompts.count=500", env={"HF_HUB_OFFLINE": "1"}).stdout
    assert "992 prompts" not in text and "1,000 prompts - 8 held out + 500 self-written, x 1" in text


@pytest.mark.parametrize("args,needle", [
    (["recipe=qwen3-8b", "plan.gpu=tpu"], "plan.gpu='tpu'"),
    (["recipe=qwen3-8b", "data.num_samples=all"], "the Hub source 'nvidia/"),  # cannot be counted offline
    (["recipe=qwen3-8b", "model.shape=smollm2"], "model.shape: unknown Qwen3 shape 'smollm2'"),
    (["recipe=qwen3-8b", "plan.gpus=3"], "split evenly over 3 processes"),
    # the GPU count the plan assumed is named, and where it came from (the tiny demo's launcher default: 8)
    (["recipe=tiny"], "(planned for 8 GPUs: launcher.nodes x launcher.gpus_per_node; plan.gpus=N plans another count)"),
    # an explicit 0 is refused, not taken for "unset" (it planned the launcher's 8 GPUs and blamed their split)
    (["recipe=tiny", "plan.gpus=0"], "plan.gpus must be >= 1, got 0"),
    (["recipe=qwen3-8b", "plan.gpus=8", "plan.prompts=-5"], "plan.prompts must be >= 1 or null (data.num_samples), got -5"),
])
def test_bad_plan_input_is_one_line(args, needle):
    p = _plan(*args, check=False)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_every_prompt_of_local_sources_is_counted(tmp_path):
    """data.num_samples unset ("all"): the plan counts the records of the local source files, says so, and a
    user's own file counts as it is."""
    own = tmp_path / "mine.jsonl"
    own.write_text("".join(json.dumps({"q": f"question {i}?"}) + "\n" for i in range(37)))
    pl = _json("recipe=tiny", "plan.gpus=1", "plan.gpu=h100",
               f"data.sources=[{{path_or_id: {own}, format: prompt, field: q}}]")
    assert pl["prompts"] == 37 and pl["documents"] == 37 - 8  # tiny's hold-out: 8
    assert pl["prompts_from"].startswith("counted in 1 local source")
    missing = _plan("recipe=tiny", "plan.gpus=1", f"data.sources=[{{path_or_id: {tmp_path / 'nope.jsonl'}, "
                    "format: prompt, field: q}]", check=False)
    assert missing.returncode == 2 and "set plan.prompts" in missing.stderr and "Traceback" not in missing.stderr


def _smollm2_gguf(tmp_path):
    """The shared SmolLM2 GGUF, reassembled from its parts in `tmp_path`."""
    gguf = tmp_path / "smol.gguf"
    with open(gguf, "wb") as out:
        for part in sorted((SHARED / "models" / "smollm2-135m-instruct").glob("*.gguf.part*")):
            out.write(part.read_bytes())
    return gguf


@pytest.mark.skipif(not (SHARED / "models" / "smollm2-135m-instruct").is_dir(), reason="no ../shared beside the checkout")
def test_smollm2_recipe_plans_from_its_gguf_with_its_own_measurements(tmp_path):
    """The SmolLM2 recipe as shipped (a GGUF, every prompt of the shared mix, 6 samples each) plans from the GGUF's
    header and the SmolLM2 / H200 measurements recorded for it (training and regeneration), not extrapolations."""
    gguf = _smollm2_gguf(tmp_path)
    pl = _json("recipe=smollm2-135m", "plan.gpus=1", "plan.gpu=h200", f"model.path={gguf}")
    assert pl["shape"] == "llama" and pl["samples_per_prompt"] == 6 and pl["prompts"] > 10_000
    for part in ("training", "regeneration"):
        assert "from smollm2-135m on 1 x h200" in pl[part]["basis"], pl[part]
    assert not pl["regeneration"]["extrapolated"]
    # its training rate at micro batch 64 was measured with eager norms; train.compile_norm_rope is now on by default
    # (measured at micro batch 128 only): the plan uses the micro-64 rate unscaled, and says so
    assert "measured with train.compile_norm_rope=false, planned with true (not scaled)" in pl["training"]["basis"]
    eager = _json("recipe=smollm2-135m", "plan.gpus=1", "plan.gpu=h200", f"model.path={gguf}",
                  "train.compile_norm_rope=false")
    assert not eager["training"]["extrapolated"]


@pytest.mark.skipif(not (SHARED / "models" / "smollm2-135m-instruct").is_dir(), reason="no ../shared beside the checkout")
def test_training_rate_comes_from_the_measurement_at_the_planned_micro_batch(tmp_path):
    """A 135M model's training step is launch-bound: its tokens/s at micro batch 32 are about twice those at 16
    (sessions 9 and 10). The plan takes the measurement at the micro batch it plans, and says so where none is."""
    gguf = _smollm2_gguf(tmp_path)
    # as those runs trained (the recipe now trains without gradient checkpointing, which the plan scales by FLOPs)
    args = ("recipe=smollm2-135m", "plan.gpus=2", "plan.gpu=h200", f"model.path={gguf}", "train.grad_checkpointing=true",
            "train.compile_norm_rope=false")
    by_micro = {e["micro_batch"]: e for e in REC["training"]
                if (e["shape"], e["gpu"], e.get("world", 1)) == ("smollm2-135m", "h200", 2)}
    assert {16, 32} <= set(by_micro)
    for micro in (16, 32):
        pl = _json(*args, f"train.micro_batch={micro}", f"train.global_batch={2 * micro}")
        tr = pl["training"]
        assert tr["tokens_per_s_per_gpu"] * 2 == pytest.approx(by_micro[micro]["tokens_per_s"]), micro
        assert not tr["extrapolated"] and by_micro[micro]["commit"] in tr["basis"]
    # no measurement at micro batch 8: the nearest entry is used and the plan says it was measured otherwise
    tr = _json(*args, "train.micro_batch=8", "train.global_batch=16")["training"]
    assert tr["extrapolated"] and "planned at 8" in tr["basis"]


@pytest.mark.skipif(not (SHARED / "models" / "smollm2-135m-instruct").is_dir(), reason="no ../shared beside the checkout")
def test_training_rate_comes_from_a_measurement_with_the_planned_compile_norm_rope(tmp_path):
    """train.compile_norm_rope changes a small model's training rate (session 14: 1.52x at micro batch 128). The plan
    takes the measurement made with the setting it plans, and says so where there is none with it."""
    gguf = _smollm2_gguf(tmp_path)
    args = ("recipe=smollm2-135m", "plan.gpus=1", "plan.gpu=h200", f"model.path={gguf}", "train.micro_batch=128",
            "train.global_batch=128")
    ones = [e for e in REC["training"] if (e["shape"], e["gpu"], e.get("world", 1), e.get("micro_batch")) ==
            ("smollm2-135m", "h200", 1, 128)]
    compiled = [e for e in ones if e.get("compile_norm_rope")][-1]
    eager = [e for e in ones if not e.get("compile_norm_rope")][-1]
    assert compiled["tokens_per_s"] > eager["tokens_per_s"]
    for on, ref in ((True, compiled), (False, eager)):
        tr = _json(*args, f"train.compile_norm_rope={str(on).lower()}")["training"]
        assert tr["tokens_per_s_per_gpu"] == pytest.approx(ref["tokens_per_s"]), on
        assert not tr["extrapolated"] and ref["commit"] in tr["basis"]
    # compiled at micro batch 64: the eager measurement at 64 is nearer (the micro batch ranks first), and said so
    tr = _json(*args[:4], "train.compile_norm_rope=true")["training"]
    assert tr["extrapolated"] and "measured with train.compile_norm_rope=false, planned with true" in tr["basis"]
