"""A tiny CLIP model folder (model, tokenizer, image processor) and a tiny imagefolder dataset,
built offline for the few-shot tests."""

import os

import numpy as np
from PIL import Image

COLORS = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "dark_yellow": (200, 190, 20),
    "white": (235, 235, 235),
}
WORDS = (
    "a photo of the centered satellite texture type picture red green blue dark yellow white . , "
    "cat dog car ship bird plane"
).split()


def write_tiny_clip(path: str, seed: int = 0) -> str:
    """Saves a 2-layer CLIP (hidden 32, 32x32 images), a word-level tokenizer and a CLIP image
    processor to `path`, loadable with AutoModel / AutoTokenizer / AutoImageProcessor."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    from tiny_models import tiny_clip_config

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "[UNK]": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="[UNK]", model_max_length=20,
    )
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(image_size=32, patch_size=8, vocab=len(vocab)))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_imagefolder(root: str, train_per_class=6, test_per_class=4, seed=0, classes=tuple(COLORS)) -> str:
    """Writes `<root>/{train,test}/<class>/<i>.png`: noisy images of one colour per class,
    so a tiny model can learn them. Returns `root`."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            n = count[name] if isinstance(count, dict) else count
            for i in range(n):
                h, w = rng.integers(28, 48, size=2)
                pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root


def adapter_deltas(output_dir: str) -> dict:
    """The singular-value changes of the adapter a run saved in `output_dir`."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(output_dir, "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if k.endswith("svd_delta")}


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two non-empty dicts of tensors with the same keys."""
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def subprocess_env() -> dict:
    """The environment of a child process that runs the repository's sources offline."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
