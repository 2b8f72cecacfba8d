"""Every shipped recipe's data settings can be met by the data it points at (skipped where that data,
e.g. ../shared beside the checkout, is absent)."""

import os

import pytest

from orthrus_train.config.loader import available_recipes, compose_unvalidated
from orthrus_train.data import DataConfig, load_sources

_seen: dict[str, object] = {}


@pytest.mark.parametrize("recipe", available_recipes())
def test_recipe_data_is_feasible(recipe):
    data = DataConfig.from_dict(compose_unvalidated(recipe).data)
    missing = [s.path_or_id for s in data.sources if not os.path.exists(s.path_or_id)]
    if missing:
        pytest.skip(f"{recipe}: data not present here: {missing}")
    key = data.fingerprint()
    if key not in _seen:  # the Qwen3 recipes share one mix: read it once
        _seen[key] = load_sources(data, require_response=not data.regenerate)  # raises when it cannot be met
    src = _seen[key]
    holdout = len(src.holdout)
    assert len(src.train) > 0 and holdout == (data.holdout_count if data.holdout_count is not None else holdout)
    if data.num_samples is not None:
        assert len(src.train) + holdout == data.num_samples
