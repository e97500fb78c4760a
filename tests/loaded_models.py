"""Tiny llama and gpt_oss models loaded once per test module: (folder, model, tokenizer).

Import the fixtures into a test module (`from loaded_models import llama, gpt_oss`) to use them.
"""

from __future__ import annotations

import pytest

from abliterate.loading import load_model, load_tokenizer


@pytest.fixture(scope="module")
def llama(tiny_model):
    folder = tiny_model("llama")
    return folder, load_model(str(folder)), load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def gpt_oss(tiny_model):
    folder = tiny_model("gpt_oss")
    return folder, load_model(str(folder)), load_tokenizer(str(folder))
