"""The qwen3-* recipes resolve to the published Orthrus recipe (docs/recipe.md cites each value)."""
import pytest
import torch

from orthrus_train.config.loader import available_recipes, compose

QWEN3 = [r for r in available_recipes() if r.startswith("qwen3-")]


def test_there_are_qwen3_recipes():
    assert len(QWEN3) == 8


@pytest.mark.parametrize("recipe", QWEN3)
def test_qwen3_recipe_is_the_published_recipe(recipe):
    cfg = compose(recipe, ["model.path=/some/checkpoint"])
    h, t, d = cfg.heads, cfg.train, cfg.data
    # K=32, 256 anchor blocks per 2048-token row, forward KL to the frozen AR distribution
    assert (h.type, h.block_size, t.seq_len, t.anchors_per_row, t.loss, t.temperature) == \
        ("orthrus", 32, 2048, 256, "kl", 1.0)
    # AdamW (0.9, 0.95), weight decay 0, lr 2e-4, cosine to 10% of the peak after 5% warmup, clip 1.0
    assert (t.betas, t.weight_decay, t.lr, t.min_lr_ratio, t.warmup_ratio, t.grad_clip) == \
        ([0.9, 0.95], 0.0, 2e-4, 0.1, 0.05, 1.0)
    # global batch 128 rows, 2 epochs, bf16
    assert (t.global_batch, t.epochs, t.max_steps, t.precision) == (128, 2.0, -1, "bf16")
    # the target's own greedy, non-thinking responses (<= 2048 new tokens) to Nemotron-v2 math/code/chat 1:1:1
    assert d.regenerate and d.temperature == 0.0 and d.max_new_tokens == 2048
    assert d.chat_template.enable_thinking is False
    assert [(s.path_or_id, s.split, s.weight) for s in d.sources] == [
        ("nvidia/Nemotron-Post-Training-Dataset-v2", split, 1.0) for split in ("math", "code", "chat")]
    assert 500_000 <= d.num_samples <= 600_000
    # twins start as the AR weights (no warm start configured)
    assert h.init_from is None and set(h.trainable) == {"q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff",
                                                        "q_norm_diff", "k_norm_diff"}


def test_cosine_floor_is_ten_percent_of_the_peak():
    from orthrus_train.train.engine import lr_lambda
    t = compose("qwen3-8b").train
    f = lr_lambda(1000, t.warmup_ratio, t.min_lr_ratio)
    assert f(49) == 1.0 and f(999) == pytest.approx(0.1, abs=1e-4) and f(525) == pytest.approx(0.55, abs=1e-3)


def test_twins_start_as_the_ar_weights_and_loss_is_mean_per_supervised_token():
    """What the trainer optimises: the KL summed over supervised tokens divided by their number."""
    from orthrus_train.losses import chunked_distill
    from orthrus_train.model import OrthrusModel, build_random, tiny_config
    from orthrus_train.train.engine import DistillStep

    m = OrthrusModel(build_random(tiny_config("qwen3", vocab_size=300), seed=0), block_size=4, vocab_len=280)
    for layer in m.decoder.layers:
        a = layer.self_attn
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            assert torch.equal(getattr(a, n + "_diff").weight, getattr(a, n).weight)
    ids = torch.randint(0, 280, (2, 40))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 5:30], mask[1, 20:40] = True, True  # uneven supervision per row
    step = DistillStep(m, "kl", "torch", 64, 1.0, 6)
    loss, st = step(ids, mask, [1, 2])
    from orthrus_train.model.anchors import sample_anchors
    anchors = [sample_anchors(mask[b:b + 1], 6, torch.Generator().manual_seed(s)) for b, s in enumerate([1, 2])]
    out = m.train_outputs(ids, mask, 6, anchors=(torch.cat([a for a, _ in anchors]),
                                                 torch.cat([v for _, v in anchors])))
    per_tok = chunked_distill(out.hs, out.ht, m.lm_weight(), chunk_size=64)[0]
    assert st["n_sup"] == per_tok.numel() > 0
    torch.testing.assert_close(loss, per_tok.mean())
