"""Trainer -> export -> official-style loading: the exported model drafts exactly what the project's own
model drafts, and its diffusion-mode greedy generation equals the project's decoding engine."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from orthrus_train.decode.engine import DecodeEngine
from orthrus_train.export.writer import export_folder
from orthrus_train.model import OrthrusModel, build_random, tiny_config


@pytest.mark.parametrize("family,vocab_len", [("qwen3", 280), ("llama", 300), ("qwen2", 290), ("qwen3_moe", 280)])
def test_export_loads_and_decodes_like_the_project(tmp_path, monkeypatch, family, vocab_len):
    """vocab_len=300 on a 300-row embedding: no spare row, so the mask token gets its own vector."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    bb = build_random(tiny_config(family, vocab_size=300, initializer_range=0.2), seed=0)
    m = OrthrusModel(bb, block_size=5, vocab_len=vocab_len).eval()
    with torch.no_grad():
        for n, p in m.backbone.named_parameters():
            if "_diff." in n:
                p.add_(torch.randn_like(p) * 0.05)
    state = dict(m.backbone.state_dict())
    if m.mask_embedding is not None:
        state["mask_embedding"] = m.mask_embedding
    out = export_folder(state, m.config, None, tmp_path / "export", block_size=5, mask_token_id=m.mask_token_id)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    assert hasattr(hf, "mask_embedding") == (m.mask_embedding is not None)

    prompt = torch.randint(0, vocab_len, (1, 9))
    # one draft block against a cache of the prompt, both implementations
    cache = m.new_cache(1, 32)
    m.ar_cached(prompt, cache)
    cache.lengths += 9
    block = torch.full((1, 5), m.mask_token_id)
    block[0, 0] = 7
    with torch.no_grad():
        ours = m.logits(m.draft(block, cache))
        _, hcache = hf.prefill(prompt)
        theirs = hf.draft(block, hcache)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    # diffusion-mode greedy generation == the project's engine == plain AR greedy
    eng = DecodeEngine(m, batch_size=1, max_len=64, verify_backend="torch")
    res = eng.generate([prompt[0].tolist()], max_new_tokens=24)
    with torch.no_grad():
        gen = hf.generate(prompt, max_new_tokens=24, use_diffusion_mode=True, temperature=0.0)
        ar = bb.generate(prompt, max_new_tokens=24, do_sample=False)
    assert gen[0, 9:].tolist() == res.rows[0].tokens == ar[0, 9:].tolist()
