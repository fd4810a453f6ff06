"""Test configuration: offline, and the shared fixtures."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import tiny_clip  # noqa: E402


@pytest.fixture
def clip():
    return tiny_clip()
