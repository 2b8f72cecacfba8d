import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("compare_reports",
                                              Path(__file__).resolve().parents[2] / "scripts" / "compare_reports.py")
cmp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cmp)


def report(acc, passed=True):
    cell = {"spec": {"acceptance_length": acc, "tpf": acc / 2, "tokens_per_s": 100 * acc}, "speedup": acc / 2}
    return {"benchmarks": {"gsm8k": {"results": {"T=0": cell}}}, "lossless": {"passed": passed}}


def test_table_marks_the_better_head_and_lossless_status():
    out = cmp.rows({"orthrus": report(3.5), "medusa": report(2.0, passed=False)})
    row = next(l for l in out if l.startswith("| gsm8k"))
    assert "3.50" in row and "2.00" in row and row.rstrip(" |").endswith("orthrus")
    assert "- orthrus: lossless PASS" in out and "- medusa: lossless FAIL" in out
