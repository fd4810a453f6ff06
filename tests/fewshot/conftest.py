"""Fixtures of the few-shot tests: a tiny CLIP folder and a tiny imagefolder, built once."""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for tiny_models
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_fewshot import write_imagefolder, write_tiny_clip  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return write_tiny_clip(str(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="session")
def colors_dir(tmp_path_factory):
    return write_imagefolder(str(tmp_path_factory.mktemp("colors")))


@pytest.fixture
def tiny_parts(tiny_clip_dir):
    """(CLIPModel, tokenizer, image processor) freshly loaded from the tiny CLIP folder."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    return (
        AutoModel.from_pretrained(tiny_clip_dir),
        AutoTokenizer.from_pretrained(tiny_clip_dir),
        AutoImageProcessor.from_pretrained(tiny_clip_dir),
    )


@pytest.fixture(scope="module")
def fewshot():
    """examples/fewshot.py as a module (a fresh copy per test module)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "fewshot.py")
    spec = importlib.util.spec_from_file_location("fewshot_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh_accelerate_state():
    """Resets accelerate's process-wide state after the test (each in-process run creates its own Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
