"""Evaluation: benchmarks, metric definitions, lossless checks, reports (`run_eval`)."""
from .config import EvalConfig, LosslessConfig


def run_eval(*args, **kwargs):
    """See `orthrus_train.eval.report.run_eval` (imported on first use: it pulls in torch and the engine)."""
    from .report import run_eval as _run_eval

    return _run_eval(*args, **kwargs)


__all__ = ["EvalConfig", "LosslessConfig", "run_eval"]
