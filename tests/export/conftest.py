"""Export tests: one session-wide set of full exports (one per family). tests/conftest.py sets HF_HUB_OFFLINE=1;
set again here so these tests also run offline on their own."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from orthrus_export_testlib import FAMILIES, MASK_ID, tiny_backbone, tiny_tokenizer, with_twins  # noqa: E402


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """{family: (backbone, backbone_config, state dict with twins, full export folder)}, built once per session."""
    from orthrus_train.export import export_folder

    root = tmp_path_factory.mktemp("exports")
    out = {}
    for family in FAMILIES:
        backbone, config = tiny_backbone(family)
        sd = with_twins(backbone)
        folder = export_folder(
            sd, config, tiny_tokenizer(), root / f"{family}_full", block_size=4, mask_token_id=MASK_ID
        )
        out[family] = (backbone, config, sd, folder)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared 2-core machine; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
