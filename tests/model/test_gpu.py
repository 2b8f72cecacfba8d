"""GPU-only checks of the core (run by scripts/gpu_suite.sh on a GPU machine; skipped elsewhere)."""
import pytest
import torch

from orthrus_train.model import OrthrusModel, build_random, tiny_config
from orthrus_train.model.anchors import sample_anchors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_compiled_flex_training_matches_inference_draft_on_cuda(family):
    torch.manual_seed(0)
    bb = build_random(tiny_config(family, vocab_size=300, hidden_size=128, heads=4, kv_heads=2), device="cuda")
    m = OrthrusModel(bb, block_size=8, vocab_len=280, attn_backend="flex")
    with torch.no_grad():
        for n, p in m.backbone.named_parameters():
            if "_diff." in n:
                p.add_(torch.randn_like(p) * 0.05)
    B, L = 2, 256
    ids = torch.randint(0, 280, (B, L), device="cuda")
    anchors, valid = sample_anchors(torch.ones_like(ids, dtype=torch.bool), 16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, kv = m.ar_pass(ids)
        train_logits = m.logits(m.diffusion_train(ids, kv, anchors)).view(B, 16, 8, -1)
        for b in range(B):
            for n in (0, 7, 15):
                a = int(anchors[b, n])
                cache = m.new_cache(1, L + 16)
                m.ar_cached(ids[b:b + 1, :a], cache)
                cache.lengths += a
                block = torch.full((1, 8), m.mask_token_id, device="cuda")
                block[0, 0] = ids[b, a]
                inf = m.logits(m.draft(block, cache))[0]
                torch.testing.assert_close(train_logits[b, n], inf, rtol=2e-4, atol=2e-4)
