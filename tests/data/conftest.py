"""Shared, session-scoped data for the data tests: one small generated corpus with its trained tokenizer."""

import pytest

from evolm_nemo.data.synthetic import ensure_synthetic
from evolm_nemo.data.tokenizer import load_tokenizer

SYNTH_DOCS, SYNTH_SEED = 200, 7


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("synth"), SYNTH_DOCS, SYNTH_SEED, vocab_size=512)


@pytest.fixture(scope="session")
def tok(synth):
    return load_tokenizer(synth.tokenizer_dir)
