"""The real SmolLM2-135M-Instruct GGUF beside the checkout: loading through transformers' GGUF
support, and the wrapper's cached passes on real weights (skipped where ../shared is absent)."""
import shutil

import pytest
import torch

from orthrus_train.model import OrthrusModel, load_backbone, load_tokenizer
from tests.conftest import SHARED

PARTS = sorted((SHARED / "models" / "smollm2-135m-instruct").glob("*.gguf.part*"))
pytestmark = pytest.mark.skipif(len(PARTS) != 2, reason="../shared/models/smollm2-135m-instruct not present")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    gguf = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(gguf, "wb") as out:
        for p in PARTS:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out)
    return load_backbone(str(gguf), dtype=torch.float32), load_tokenizer(str(gguf))


def test_gguf_backbone_answers_and_orthrus_wrapper_is_exact(smollm2):
    bb, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = bb.generate(ids, max_new_tokens=12, do_sample=False)
    assert "4" in tok.decode(out[0, ids.shape[1]:])  # a real instruction-tuned model, correctly dequantized
    m = OrthrusModel(bb, block_size=8, vocab_len=len(tok))
    assert m.mask_token_id == 49152 and m.mask_embedding is not None  # SmolLM2 has no spare row
    cache = m.new_cache(1, 64)
    with torch.no_grad():
        h = m.ar_cached(out[:, :-1], cache)
        torch.testing.assert_close(m.logits(h), bb(out[:, :-1]).logits, rtol=1e-4, atol=1e-4)
