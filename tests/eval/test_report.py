"""run_eval end to end on a tiny model: report files, metrics per benchmark and temperature, the multi-turn protocol,
training-overlap exclusion, the lossless section."""
import json

from eval_testlib import word_tokenizer, write_prompt_files
from orthrus_train.eval.benchmarks import PromptRenderer, first_turn_key
from orthrus_train.eval.report import run_eval


def test_run_eval_writes_report(qwen3_model, tmp_path, capsys):
    tok = word_tokenizer()
    _, chat = write_prompt_files(tmp_path, n=5)
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    holdout = [f"w{i} w{i + 1} w{i + 2}" for i in range(6)]
    (run / "data" / "holdout.jsonl").write_text("".join(
        json.dumps({"uid": f"0:{i}", "messages": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": "w9"}]}) + "\n"
        for i, q in enumerate(holdout)))
    # the data stage's training prompts: one of them is also a holdout prompt (must be reported and excluded)
    train = {"messages": [{"role": "user", "content": holdout[2]}]}
    (run / "data" / "prompts.jsonl").write_text(json.dumps(train) + "\n")
    cfg = dict(benchmarks=["holdout", "chat"], benchmark_paths={"chat": str(chat)}, benchmark_fields={"chat": "turns"},
               num_prompts=5, max_new_tokens=16, temperatures=[0.0, 1.0], batch_size=3, verify_backend="torch",
               hf_generate_reference=True,
               lossless=dict(greedy_prompts=5, ks_min_tokens=1500, chi2_prefixes=1, chi2_samples=300,
                             chi2_min_conditional=60))
    rep = run_eval(qwen3_model, tok, cfg, run)
    out = run / "eval"
    for f in ("report.json", "report.md", "samples.jsonl", "accept_histogram.png", "per_position_acceptance.png",
              "tpf.png", "speed.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["benchmarks"].keys() == rep["benchmarks"].keys() == {"holdout", "chat"}
    assert set(on_disk["definitions"]) >= {"acceptance_length", "tpf"} and on_disk["settings"]["num_prompts"] == 5

    hold = on_disk["benchmarks"]["holdout"]
    assert hold["train_overlap"] == 1 and hold["excluded"] == 1 and hold["used"] == 5
    assert on_disk["train_prompts"]["hashes"] == 1
    for name, b in on_disk["benchmarks"].items():
        assert set(b["results"]) == {"T=0", "T=1"}
        for cell in b["results"].values():
            s, a = cell["spec"], cell["ar"]
            assert s["prompts"] == 5 and s["verify_passes"] == s["draft_passes"] > 0
            assert 1.0 <= s["acceptance_length"] <= 4.0 and s["tpf"] == s["emitted_tokens"] / (2 * s["verify_passes"])
            assert a["acceptance_length"] == a["tpf"] == 1.0 and a["draft_passes"] == 0
            assert cell["speedup"] > 0 and cell["hf_generate"]["tokens_per_s"] > 0
            assert len(s["per_position_acceptance"]) == 3 and abs(sum(s["accept_histogram"]) - 1) < 1e-9
            assert s["warnings"]  # fewer than 100 prompts
        assert b["results"]["T=0"]["hf_generate"]["greedy_first_turn_match_rate"] == 1.0

    # multi-turn: the 2nd turn is asked after the model's own 1st answer
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    chat_rows = [s for s in samples if s["benchmark"] == "chat" and s["method"] == "spec" and s["temperature"] == 1.0]
    assert len(chat_rows) == 5 and all(len(s["turns"]) == 2 for s in chat_rows)
    turns = [json.loads(ln)["turns"] for ln in chat.read_text().splitlines()]
    r = PromptRenderer(tok)
    for row, t in zip(chat_rows, turns):
        expect = r.encode(t, [r.decode(row["turns"][0]["tokens"])])
        assert row["turns"][1]["prompt_len"] == len(expect)

    ll = on_disk["lossless"]
    assert ll["passed"] and ll["greedy"]["match_rate"] == 1.0 and ll["greedy"]["prompts"] == 5
    assert ll["ks"]["tokens"] >= 1500 and ll["ks"]["passed"]
    assert ll["chi_square"]["passed"] and ll["chi_square"]["testable"] >= 1

    md = (out / "report.md").read_text()
    assert "| benchmark | temp | prompts | acceptance length | TPF |" in md and "Lossless checks: **PASS**" in md
    assert "tiny model" in md and "![speed.png](speed.png)" in md
    printed = capsys.readouterr().out
    assert "acc.len" in printed and "holdout" in printed and "only show that the machinery works" in printed
    assert first_turn_key(holdout[2]) not in {first_turn_key(t[0]) for t in turns}
