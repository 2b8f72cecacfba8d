"""The exported runtime on a GPU (skipped where there is none): devices, dtypes, heads-only loading."""
import pytest
import torch
from orthrus_export_testlib import MASK_ID, VOCAB, greedy_ar, load_remote, prompt, tiny_backbone, with_twins

from orthrus_train.export import export_folder, load_orthrus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_lossless_on_cuda(tmp_path, family):
    backbone, config = tiny_backbone(family)
    folder = export_folder(with_twins(backbone), config, None, tmp_path / "f", block_size=4, mask_token_id=MASK_ID)
    model = load_remote(folder, device_map="cuda")
    backbone = backbone.cuda()
    ids = prompt(7).cuda()
    no_eos = VOCAB + 1
    expected = greedy_ar(backbone, ids, 24, eos_token_id=no_eos)
    assert torch.equal(model.generate(ids, max_new_tokens=24, eos_token_id=no_eos), expected)
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=24, temperature=0.8, eos_token_id=no_eos)
    assert sampled.shape == (1, 31) and sampled.device.type == "cuda"
    half = load_remote(folder, device_map="cuda", dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj_diff.weight.dtype == torch.bfloat16
    assert half.generate(ids, max_new_tokens=24, eos_token_id=no_eos).shape == (1, 31)


def test_heads_only_on_cuda(tmp_path):
    backbone, config = tiny_backbone("qwen3")
    backbone.save_pretrained(tmp_path / "base")
    folder = export_folder(with_twins(backbone), config, None, tmp_path / "h", layout="heads", block_size=4,
                           mask_token_id=MASK_ID, base_model_id=str(tmp_path / "base"))
    model = load_orthrus(folder, device_map="cuda")
    assert model.model.layers[1].self_attn.k_norm_diff.weight.device.type == "cuda"
    ids = prompt(6).cuda()
    expected = greedy_ar(backbone.cuda(), ids, 16, eos_token_id=VOCAB + 1)
    assert torch.equal(model.generate(ids, max_new_tokens=16, eos_token_id=VOCAB + 1), expected)
