"""Regeneration on tiny random backbones: batching, stopping, seeds, shards, ranks, resume."""

import json
import warnings

import pytest

from orthrus_train.data import ChatRenderer, HFGenerator, load_responses, regenerate
from orthrus_train.data.regen import Generator

from .conftest import tiny_backbone

QUESTIONS = ["hi", "what is two plus two?", "x", "tell me a story about a cat", "ok", "why is the sky blue",
             "name three colors", "a"]


@pytest.fixture(scope="module")
def prompts(byte_tok):
    r = ChatRenderer(byte_tok)
    return [r.encode_prompt([{"role": "user", "content": q}]).input_ids for q in QUESTIONS]


@pytest.fixture(scope="module")
def gen(byte_tok):
    return HFGenerator(tiny_backbone(byte_tok), [byte_tok.eos_token_id], byte_tok.pad_token_id)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batched_left_padded_static_cache_equals_one_by_one(byte_tok, prompts, family):
    gen = HFGenerator(tiny_backbone(byte_tok, family=family), [byte_tok.eos_token_id], byte_tok.pad_token_id)
    assert gen.static_cache and isinstance(gen, Generator)
    batched = gen.generate(prompts, 8)
    assert len({t for r in batched for t in r}) > 3  # the random model writes varied text, not one token
    dynamic = HFGenerator(gen.model, gen.eos_token_ids, gen.pad_token_id, static_cache=False)
    assert batched == [dynamic.generate([p], 8)[0] for p in prompts]


def test_stops_at_eos_inclusive(gen, prompts):
    free = gen.generate(prompts[:1], 12)[0]
    stop = free[4]
    k = free.index(stop)
    cut = HFGenerator(gen.model, [stop], gen.pad_token_id).generate(prompts[:1], 12)[0]
    assert cut == free[: k + 1]


def test_sampling_is_seeded(gen, prompts):
    a = gen.generate(prompts, 10, temperature=1.0, seed=7)
    assert a == gen.generate(prompts, 10, temperature=1.0, seed=7)
    assert a != gen.generate(prompts, 10, temperature=1.0, seed=8)
    assert a != gen.generate(prompts, 10)


def test_falls_back_to_dynamic_cache_with_a_warning(gen, prompts):
    class NoStatic:
        """The real model, refusing static caches the way unsupported models do."""

        def __init__(self, model):
            self.model = model

        def eval(self):
            return self

        def parameters(self):
            return self.model.parameters()

        def generate(self, generation_config, **kw):
            if generation_config.cache_implementation == "static":
                raise ValueError("This model does not support cache_implementation='static'")
            return self.model.generate(generation_config=generation_config, **kw)

    g = HFGenerator(NoStatic(gen.model), gen.eos_token_ids, gen.pad_token_id)
    with pytest.warns(UserWarning, match="falling back to the dynamic cache"):
        out = g.generate(prompts[:3], 6)
    assert out == gen.generate(prompts[:3], 6) and g.static_cache is False


def run(prompts, gen, out_dir, **kw):
    args = dict(max_new_tokens=6, temperature=1.0, seed=3, batch_size=3, shard_size=3, progress=False)
    args.update(kw)
    return regenerate(prompts, gen, out_dir, **args)


def test_shards_ranks_and_resume(gen, prompts, tmp_path):
    stats = run(prompts, gen, tmp_path / "one")
    assert stats.shards == 3 and stats.shards_done == 3 and stats.prompts == len(prompts)
    whole, totals = load_responses(tmp_path / "one", len(prompts), 3)
    assert totals["new_tokens"] == sum(len(r) for r in whole) == stats.new_tokens

    # rank r of world w takes shards r, r+w, ...; together they write what one process writes
    s1 = run(prompts, gen, tmp_path / "two", rank=1, world_size=2)
    assert sorted(p.name for p in (tmp_path / "two").glob("shard-*")) == ["shard-00001.json"]
    with pytest.raises(FileNotFoundError, match=r"shards \[0, 2\] are not finished"):
        load_responses(tmp_path / "two", len(prompts), 3)
    s0 = run(prompts, gen, tmp_path / "two", rank=0, world_size=2)
    assert (s0.shards_done, s1.shards_done) == (2, 1)
    assert load_responses(tmp_path / "two", len(prompts), 3)[0] == whole

    # a finished shard is never redone; a missing one is
    done = tmp_path / "one" / "shard-00000.json"
    before = done.stat().st_mtime_ns
    (tmp_path / "one" / "shard-00002.json").unlink()
    again = run(prompts, gen, tmp_path / "one")
    assert (again.shards_done, again.shards_skipped) == (1, 2)
    assert done.stat().st_mtime_ns == before
    assert load_responses(tmp_path / "one", len(prompts), 3)[0] == whole

    # the folder belongs to these prompts and settings
    with pytest.raises(RuntimeError, match="delete .* to regenerate"):
        run(prompts, gen, tmp_path / "one", max_new_tokens=7)


def test_non_generator_is_refused(prompts, tmp_path):
    with pytest.raises(TypeError, match="does not implement Generator.generate"):
        regenerate(prompts, object(), tmp_path, max_new_tokens=4, progress=False)


def test_responses_stay_in_prompt_order(gen, prompts, tmp_path):
    """Length bucketing reorders batches, never the responses."""
    run(prompts, gen, tmp_path, temperature=0.0, shard_size=8, batch_size=8)
    responses, _ = load_responses(tmp_path, len(prompts), 8)
    assert responses == gen.generate(prompts, 6)
    data = json.loads((tmp_path / "shard-00000.json").read_text())
    assert data["start"] == 0 and len(data["responses"]) == len(prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gen.generate([], 4) == []


def test_sampled_rounds_with_a_generator_without_top_k(gen, prompts, tmp_path):
    """A generator whose generate takes only temperature and seed (e.g. a server's) still makes the sampled
    rounds, at the generation config's temperature, and says that top-k / top-p were not applied."""
    seen = []

    class Plain:
        def generate(self, prompts, max_new_tokens, *, temperature=0.0, seed=0):
            seen.append(temperature)
            return gen.generate(prompts, max_new_tokens, temperature=temperature, seed=seed)

        def sampling_defaults(self):
            return (0.7, 20, 0.95)

    with pytest.warns(UserWarning, match="takes no top_k/top_p: sampling at temperature 0.7 without top-k 20"):
        stats = run(prompts, Plain(), tmp_path, temperature=0.0, samples_per_prompt=2)
    assert stats.shards == 6 and sorted(set(seen)) == [0.0, 0.7]
    resp, _ = load_responses(tmp_path, len(prompts), 3, samples_per_prompt=2)
    assert resp[:len(prompts)] == gen.generate(prompts, 6)
    assert json.loads((tmp_path / "meta.json").read_text())["sampling"] == [0.7, 20, 0.95]
