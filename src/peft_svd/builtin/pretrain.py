"""Contrastive pretraining of the small built-in CLIP on rendered glyphs and their captions.

The pieces, in the order `examples/pretrain_builtin.py` uses them: `train_tokenizer` (a CLIP-style
byte-level BPE learned from the captions with the tokenizers library), `build_config` (a tiny
Hugging Face CLIP whose layers keep CLIPModel's names), `build_processor`, `pretrain` (the
contrastive training loop, on an endless stream of fresh renders), `zero_shot_accuracy` and
`save`. The result loads with `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained`.
"""

import math
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from .data import IMAGE_SIZE, PRETRAINING_CHARACTERS, _stream, render_glyphs

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
"""Normalisation of the pixel values, shared by `pixel_values` and the saved image processor."""

MAX_TOKENS = 32
"""Text length the model supports (position embeddings); captions are about 10-20 tokens."""

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def sample_captions(n: int, seed: int = 0) -> list[str]:
    """Returns `n` captions drawn as pretraining draws them (the tokenizer's training text)."""
    rng = _stream(seed, "tokenizer")
    labels = rng.integers(0, len(PRETRAINING_CHARACTERS), size=n)
    return render_glyphs(PRETRAINING_CHARACTERS, labels, rng)[1]


def train_tokenizer(captions: Iterable[str], vocab_size: int = 640) -> CLIPTokenizer:
    """Learns a CLIP tokenizer (lower-cased byte-level BPE with "</w>" word ends) from `captions`.

    The pipeline is the one `CLIPTokenizer` rebuilds from vocab.json and merges.txt, so the saved
    files load as a plain CLIP tokenizer. Every byte, with and without "</w>", is in the
    vocabulary: words the captions never used (a new class name) still encode, as pieces.

    Returns:
        A CLIPTokenizer with `len(tokenizer) <= vocab_size + 2 * 256` tokens; ids 0 and 1 are
        "<|startoftext|>" and "<|endoftext|>" (also the padding token, as in CLIP).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    # Same normaliser and pre-tokeniser as transformers' CLIPTokenizer.
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_BOS, _EOS],
        initial_alphabet=_byte_alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(captions, trainer=trainer)
    learned = backend.get_vocab()
    merges = _merges_of(backend)
    # Special tokens first, then every byte alone and word-final, then the learned merges.
    vocab = {_BOS: 0, _EOS: 1}
    for symbol in _byte_alphabet():
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    for token, _ in sorted(learned.items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def _merges_of(backend) -> list[tuple[str, str]]:
    import json

    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def build_config(
    tokenizer: CLIPTokenizer,
    *,
    width: int = 128,
    layers: int = 4,
    heads: int = 4,
    mlp_ratio: int = 4,
    patch_size: int = 8,
    projection_dim: int = 128,
) -> CLIPConfig:
    """A tiny CLIP: a ViT on IMAGE_SIZE-pixel images and a causal text transformer, both
    `layers` blocks of width `width`, with CLIP's module names (q_proj, k_proj, v_proj,
    out_proj, fc1, fc2).

    Returns:
        The CLIPConfig; `CLIPModel(config)` builds the randomly initialised model.
    """
    common = dict(
        hidden_size=width,
        intermediate_size=mlp_ratio * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    return CLIPConfig(
        text_config=dict(
            **common,
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(**common, image_size=IMAGE_SIZE, patch_size=patch_size),
        projection_dim=projection_dim,
    )


def build_processor(tokenizer: CLIPTokenizer) -> CLIPProcessor:
    """The processor that turns images and texts into model inputs exactly as pretraining did:
    IMAGE_SIZE pixels, mean / std IMAGE_MEAN / IMAGE_STD."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 images (n, IMAGE_SIZE, IMAGE_SIZE, 3) -> normalised float32 (n, 3, IMAGE_SIZE,
    IMAGE_SIZE), the same values the saved CLIPProcessor produces."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def contrastive_loss(logits_per_image: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Symmetric cross-entropy of CLIP, where every pair with the same caption is a positive.

    Short captions ("a photo of the letter g.") repeat within a batch; counting their other
    images as negatives would push apart what the text cannot tell apart.

    Args:
        logits_per_image: (batch, batch) scaled similarities, image i against caption j.
        captions: the batch's captions, length batch.

    Returns:
        The scalar loss.
    """
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    keys = torch.tensor([ids[c] for c in captions], device=logits_per_image.device)
    same = (keys[:, None] == keys[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets))


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Weight decay on matrices only: norms, biases, embeddings and the logit scale keep theirs.
    decay, rest = [], []
    for name, p in model.named_parameters():
        matrix = p.ndim == 2 and "embedding" not in name
        (decay if matrix else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def pretrain(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    *,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 150,
    seed: int = 0,
    characters: str = PRETRAINING_CHARACTERS,
    curriculum_fraction: float = 0.3,
    final_plain_fraction: float = 0.1,
    show_progress: bool = True,
) -> dict:
    """Trains `model` in place with the contrastive loss on fresh renders of `characters`.

    Every step renders `batch_size` new images (uniform over characters) with their captions,
    from a random stream of its own, so pretraining never sees the images of the built-in
    datasets. AdamW with linear warm-up then cosine decay to zero, one step per batch.

    Curriculum: a ViT trained from scratch on the fully varied renders sits at chance for
    hundreds of steps. So the share of plain renders (large, upright, black on white) starts at
    1 and falls linearly to `final_plain_fraction` over the first `curriculum_fraction` of the
    steps; shapes are learnt on plain renders, invariance to colour, size, position, rotation
    and blur afterwards.

    Returns:
        {"steps", "seconds" (wall clock), "cpu_seconds" (all threads), "final_loss" and "final_batch_match" (means over the last 50 steps;
        match: share of images whose most similar caption in the batch is their own),
        "losses" (per step)}.
    """
    torch.manual_seed(seed)
    rng = _stream(seed, "pretraining")
    model.train()
    optimizer = torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses, matched = [], []
    start, start_cpu = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="pretraining", disable=not show_progress)
    for step in bar:
        progress = step / max(1.0, curriculum_fraction * steps)
        plain = max(final_plain_fraction, 1.0 - progress * (1.0 - final_plain_fraction))
        labels = rng.integers(0, len(characters), size=batch_size)
        images, captions = render_glyphs(characters, labels, rng, plain_fraction=plain)
        text = tokenizer(captions, padding=True, return_tensors="pt")
        out = model(
            input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixel_values(images)
        )
        loss = contrastive_loss(out.logits_per_image, captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))  # CLIP's cap on the temperature
        losses.append(loss.item())
        # Share of images whose most similar caption in the batch is one of theirs.
        hits = out.logits_per_image.argmax(dim=1).tolist()
        matched.append(np.mean([captions[j] == captions[i] for i, j in enumerate(hits)]))
        if step % 10 == 0:
            bar.set_postfix(
                loss=f"{np.mean(losses[-50:]):.3f}",
                match=f"{np.mean(matched[-50:]):.2f}",
                plain=f"{plain:.2f}",
            )
    model.eval()
    return {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - start_cpu,
        "final_loss": float(np.mean(losses[-50:])),
        "final_batch_match": float(np.mean(matched[-50:])),
        "losses": losses,
    }


@torch.no_grad()
def zero_shot_accuracy(
    model: CLIPModel,
    processor: CLIPProcessor,
    dataset,
    template: str,
    batch_size: int = 256,
) -> float:
    """Accuracy of zero-shot classification: each image goes to the class whose prompt
    `template.format(name)` is most similar (cosine) to it.

    Args:
        dataset: a datasets.Dataset with "image" (PIL) and "label" (ClassLabel) columns.
        template: prompt with one "{}" for the class name.

    Returns:
        The fraction of correctly classified images, in [0, 1].
    """
    from peft_svd.fewshot.zeroshot import encode_images, zero_shot_head

    model.eval()
    head = zero_shot_head(model, processor.tokenizer, dataset.features["label"].names, template)
    correct = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        pixels = processor.image_processor(images=rows["image"], return_tensors="pt").pixel_values
        predicted = (encode_images(model, pixels) @ head.t()).argmax(dim=-1)
        correct += (predicted == torch.tensor(rows["label"])).sum().item()
    return correct / len(dataset)


def save(model: CLIPModel, processor: CLIPProcessor, directory: str) -> None:
    """Writes the model (config.json, model.safetensors, float32) and the processor (tokenizer
    and image processor files) to `directory`, in Hugging Face format."""
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    # transformers 5 nests the image processor in processor_config.json; the stand-alone
    # preprocessor_config.json is what transformers 4 looks for.
    processor.image_processor.save_pretrained(directory)
