"""Eval tests: CPU, tiny random models, offline. One thread: the models are tiny and the cores are shared."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def qwen3_model():
    from eval_testlib import trained_model

    return trained_model("qwen3")


@pytest.fixture(scope="session")
def llama_model():
    from eval_testlib import trained_model

    return trained_model("llama")
