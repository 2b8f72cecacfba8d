"""export_folder -> folder -> load (trust_remote_code and load_orthrus); every broken folder is refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from orthrus_export_testlib import (
    MASK_ID,
    VOCAB,
    greedy_ar,
    load_remote,
    prompt,
    tiny_backbone,
    tiny_tokenizer,
    with_twins,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from orthrus_train.export import (
    OrthrusCheckpointError,
    base_weights_sha256,
    export_folder,
    load_orthrus,
    validate_folder,
)
from orthrus_train.export.modeling_orthrus import expected_shapes

PKG = Path(__file__).resolve().parents[2] / "orthrus_train" / "export"


def _keys(folder, name="model.safetensors"):
    with safe_open(str(Path(folder) / name), framework="pt") as f:
        return set(f.keys())


def test_full_folder_contents_tied(exported):
    _, config, sd, folder = exported["qwen3"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "orthrus" and cfg["architectures"] == ["OrthrusLM"]
    assert cfg["auto_map"] == {
        "AutoConfig": "modeling_orthrus.OrthrusConfig",
        "AutoModelForCausalLM": "modeling_orthrus.OrthrusLM",
    }
    assert (cfg["backbone_model_type"], cfg["block_size"], cfg["mask_token_id"]) == ("qwen3", 4, MASK_ID)
    assert cfg["hidden_size"] == 64 and cfg["head_dim"] == 16 and cfg["tie_word_embeddings"] is True
    assert (folder / "modeling_orthrus.py").read_bytes() == (PKG / "modeling_orthrus.py").read_bytes()
    for name in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "orthrus_export.json",
    ):
        assert (folder / name).exists(), name
    keys = _keys(folder)
    assert "lm_head.weight" not in keys  # tied: stored once, as embed_tokens
    assert keys == set(sd) - {"lm_head.weight"}
    stored = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(stored[k], sd[k]) for k in stored)
    assert validate_folder(folder)["layout"] == "full"
    model = load_remote(folder, attn_implementation="eager")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.block_size == 4 and model.config.mask_token_id == MASK_ID
    assert model.model.config._attn_implementation == "eager"  # reaches the stock backbone


def test_official_style_config_without_backbone_type_loads_as_qwen3(tmp_path, exported):
    backbone, _, _, folder = exported["qwen3"]
    official = tmp_path / "official"
    shutil.copytree(folder, official)
    cfg = json.loads((official / "config.json").read_text())
    del cfg["backbone_model_type"], cfg["base_model_name_or_path"], cfg["base_revision"], cfg["base_sha256"]
    (official / "config.json").write_text(json.dumps(cfg))
    ids = prompt(5)
    with torch.no_grad():
        assert torch.equal(load_remote(official)(ids).logits, backbone(ids).logits)


def test_untied_backbone_stores_lm_head(exported):
    _, _, sd, folder = exported["llama"]
    assert "lm_head.weight" in _keys(folder)
    model = load_remote(folder)
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_sharded_export_round_trips(tmp_path, exported):
    backbone, config, sd, _ = exported["qwen2"]
    folder = export_folder(
        sd, config, None, tmp_path / "sharded", block_size=4, mask_token_id=MASK_ID, max_shard_size="60KB"
    )
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and not (folder / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(shards)
    model = load_orthrus(folder)
    ids = prompt(6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, backbone(ids).logits)
    assert torch.equal(
        model.generate(ids, max_new_tokens=12, eos_token_id=VOCAB + 1),
        greedy_ar(backbone, ids, 12, eos_token_id=VOCAB + 1),
    )


def test_overwrite_and_atomic_failure(tmp_path, exported):
    _, config, sd, _ = exported["llama"]
    out = export_folder(sd, config, None, tmp_path / "x", block_size=4, mask_token_id=MASK_ID)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_folder(sd, config, None, out, block_size=4, mask_token_id=MASK_ID)
    export_folder(sd, config, None, out, block_size=6, mask_token_id=MASK_ID, overwrite=True)
    assert json.loads((out / "config.json").read_text())["block_size"] == 6
    broken = {k: v for k, v in sd.items() if "layers.1.self_attn.v_proj_diff" not in k}
    with pytest.raises(
        OrthrusCheckpointError, match=r"missing \(1\): model\.layers\.1\.self_attn\.v_proj_diff\.weight"
    ):
        export_folder(broken, config, None, tmp_path / "y", block_size=4, mask_token_id=MASK_ID)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no half-written folder, no temp left behind


def test_writer_rejects_bad_arguments(tmp_path, exported):
    _, config, sd, _ = exported["qwen3"]
    with pytest.raises(ValueError, match="mask_token_id=301 is outside"):
        export_folder(sd, config, None, tmp_path / "a", block_size=4, mask_token_id=301)
    # id == vocab_size means "no spare row": the mask token's own vector must then be exported
    with pytest.raises(OrthrusCheckpointError, match=r"missing \(1\): mask_embedding"):
        export_folder(sd, config, None, tmp_path / "a2", block_size=4, mask_token_id=300)
    with pytest.raises(ValueError, match="base_model_id"):
        export_folder(sd, config, None, tmp_path / "b", layout="heads", block_size=4, mask_token_id=MASK_ID)
    untied = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"] + 1})
    with pytest.raises(OrthrusCheckpointError, match="lm_head.weight differs"):
        export_folder(untied, config, None, tmp_path / "c", block_size=4, mask_token_id=MASK_ID)
    stray = dict(sd, **{"model.layers.0.self_attn.x_proj_diff.weight": torch.zeros(2)})
    with pytest.raises(OrthrusCheckpointError, match=r"unexpected \(1\): model\.layers\.0\.self_attn\.x_proj_diff"):
        export_folder(stray, config, None, tmp_path / "d", block_size=4, mask_token_id=MASK_ID)


# ------------------------------------------------------------------------------------------------ heads-only layout
@pytest.fixture(scope="module")
def heads_export(tmp_path_factory):
    """{family: (backbone, full-export twins state dict, base folder, heads folder)} for a tied and a MoE backbone."""
    root = tmp_path_factory.mktemp("heads")
    out = {}
    for family in ("qwen3", "qwen3_moe"):
        backbone, config = tiny_backbone(family)
        base = root / f"{family}_base"
        backbone.save_pretrained(base)
        tiny_tokenizer().save_pretrained(base)
        sd = with_twins(backbone)
        heads = export_folder(
            sd,
            config,
            tiny_tokenizer(),
            root / f"{family}_heads",
            layout="heads",
            block_size=4,
            mask_token_id=MASK_ID,
            base_model_id=str(base),
            base_revision="main",
        )
        out[family] = (backbone, sd, base, heads)
    return out


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_heads_only_round_trip(heads_export, family):
    backbone, sd, base, folder = heads_export[family]
    assert not list(folder.glob("model*.safetensors"))
    assert _keys(folder, "orthrus_heads.safetensors") == {k for k in sd if "_diff." in k}
    meta = json.loads((folder / "orthrus_heads.json").read_text())
    assert meta["base_model"] == str(base) and meta["base_revision"] == "main"
    assert meta["base_sha256"] == base_weights_sha256(backbone.state_dict(), backbone.config.tie_word_embeddings)
    assert json.loads((folder / "config.json").read_text())["base_model_name_or_path"] == str(base)
    ids = prompt(7)
    expected = greedy_ar(backbone, ids, 16, eos_token_id=VOCAB + 1)
    for model in (load_remote(folder), load_orthrus(folder, base=base)):
        params = dict(model.named_parameters())
        assert all(torch.equal(params[k], sd[k]) for k in sd if "_diff." in k)
        assert torch.equal(model.generate(ids, max_new_tokens=16, eos_token_id=VOCAB + 1), expected)


def test_heads_refuse_a_different_base(tmp_path, heads_export):
    backbone, _, _, folder = heads_export["qwen3"]
    other = tiny_backbone("qwen3", seed=123)[0]  # same architecture, other weights
    other.save_pretrained(tmp_path / "other")
    for load in (
        lambda: load_orthrus(folder, base=tmp_path / "other"),
        lambda: load_remote(folder, base=str(tmp_path / "other")),
    ):
        with pytest.raises(ValueError, match="does not match the base the heads .* were trained on: weights sha256"):
            load()
    llama = tiny_backbone("llama")[0]
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(OrthrusCheckpointError, match="is a llama model"):
        load_orthrus(folder, base=tmp_path / "llama")


def test_heads_folder_with_a_missing_twin_is_refused(tmp_path, heads_export):
    _, _, base, folder = heads_export["qwen3"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(str(broken / "orthrus_heads.safetensors"))
    del tensors["model.layers.0.self_attn.k_norm_diff.weight"]
    save_file(tensors, str(broken / "orthrus_heads.safetensors"))
    with pytest.raises(
        OrthrusCheckpointError, match=r"missing \(1\): model\.layers\.0\.self_attn\.k_norm_diff\.weight"
    ):
        load_orthrus(broken, base=base)


# ------------------------------------------------------------------------------------------------ broken full folders
def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _edit(change):
    def apply(folder):
        tensors = load_file(str(folder / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "model.safetensors"))

    return apply


BROKEN = {
    "truncated": (_truncate, r"model\.safetensors: file is \d+ bytes but its header describes \d+; it is truncated"),
    "stray key": (
        _edit(lambda t: t.__setitem__("model.layers.0.self_attn.extra_diff.weight", torch.zeros(3))),
        r"unexpected \(1\): model\.layers\.0\.self_attn\.extra_diff\.weight",
    ),
    "missing key": (
        _edit(lambda t: t.pop("model.layers.1.self_attn.o_proj_diff.weight")),
        r"missing \(1\): model\.layers\.1\.self_attn\.o_proj_diff\.weight",
    ),
    "shape mismatch": (
        _edit(lambda t: t.__setitem__("model.layers.0.self_attn.q_proj_diff.weight", torch.zeros(64, 32))),
        r"wrong shape \(1\): model\.layers\.0\.self_attn\.q_proj_diff\.weight: found \(64, 32\), "
        r"config expects \(64, 64\)",
    ),
    "lm_head stored though tied": (
        _edit(lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone())),
        r"unexpected \(1\): lm_head\.weight",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_full_folder_is_refused(tmp_path, exported, case):
    folder = tmp_path / "broken"
    shutil.copytree(exported["qwen3"][3], folder)
    damage, message = BROKEN[case]
    damage(folder)
    for load in (lambda: load_remote(folder), lambda: load_orthrus(folder), lambda: validate_folder(folder)):
        with pytest.raises(ValueError, match=message):  # OrthrusCheckpointError (the remote copy is another class)
            load()


def test_index_disagreeing_with_shards_is_refused(tmp_path, exported):
    _, config, sd, _ = exported["llama"]
    folder = export_folder(
        sd, config, None, tmp_path / "s", block_size=4, mask_token_id=MASK_ID, max_shard_size="100KB"
    )
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = "model.layers.0.self_attn.q_proj_diff.weight"
    index["weight_map"][moved] = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][moved])
    index_path.write_text(json.dumps(index))
    with pytest.raises(OrthrusCheckpointError, match="disagrees with the shard files for 1 tensors: " + moved):
        load_orthrus(folder)


def test_expected_shapes_follow_the_config(exported):
    _, config, _, folder = exported["qwen2"]
    cfg = load_remote(folder).config
    shapes = expected_shapes(cfg, "heads")
    assert shapes["model.layers.0.self_attn.k_proj_diff.bias"] == (32,)
    assert shapes["model.layers.0.self_attn.o_proj_diff.weight"] == (64, 64)
    assert len(shapes) == config.num_hidden_layers * 7  # 4 weights + q/k/v biases


def test_reexport_of_a_loaded_model_is_identical(tmp_path, exported):
    _, _, _, folder = exported["qwen3"]
    model = load_orthrus(folder)
    again = export_folder(
        model, model.config.backbone_config(), None, tmp_path / "again", block_size=4, mask_token_id=MASK_ID
    )
    first, second = load_file(str(folder / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
