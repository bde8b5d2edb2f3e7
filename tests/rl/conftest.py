"""The RL tests start from the shared SFT parent (tests/conftest.py: sft_parent)."""

import pytest


@pytest.fixture(scope="session")
def rl_parent(sft_parent):
    return sft_parent
