"""Pretrains the small CLIP that ships with peft-svd (src/peft_svd/builtin/clip/).

The defaults reproduce the shipped model, on CPU, in about 20 minutes on 2 cores:

    HF_HUB_OFFLINE=1 python examples/pretrain_builtin.py

Steps: learn a CLIP tokenizer from captions of rendered glyphs, build a tiny CLIP (ViT and text
transformer, 4 blocks of width 128 each), train it contrastively on fresh renders of lowercase
letters and digits with their captions, report zero-shot accuracy on the test split of every
built-in dataset, and save model, tokenizer and image processor in Hugging Face format together
with pretraining.json (arguments, time, accuracies).
"""

import argparse
import json
import os

import numpy as np
import torch
from transformers import CLIPModel

from peft_svd import builtin
from peft_svd.builtin import pretrain

DEFAULT_OUTPUT = os.path.join(os.path.dirname(__file__), os.pardir, "src", "peft_svd", "builtin", "clip")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir", default=os.path.normpath(DEFAULT_OUTPUT), help="where the model is saved"
    )
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128, help="image-caption pairs per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=150)
    parser.add_argument("--width", type=int, default=128, help="hidden size of both encoders")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks in each encoder")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=640, help="BPE vocabulary budget of the tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # The tokenizer learns its merges from captions drawn like the pretraining ones.
    tokenizer = pretrain.train_tokenizer(
        pretrain.sample_captions(4000, seed=args.seed), vocab_size=args.vocab_size
    )
    processor = pretrain.build_processor(tokenizer)

    config = pretrain.build_config(
        tokenizer, width=args.width, layers=args.layers, patch_size=args.patch_size
    )
    model = CLIPModel(config)
    print(
        f"tokenizer: {len(tokenizer)} tokens; model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    )

    stats = pretrain.pretrain(
        model,
        tokenizer,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
    )
    print(
        f"pretraining: {stats['steps']} steps in {stats['seconds'] / 60:.1f} min, final loss {stats['final_loss']:.3f}"
    )

    accuracy = {}
    for name in builtin.DATASETS:
        test = builtin.load_dataset(name, seed=0)["test"]
        accuracy[name] = pretrain.zero_shot_accuracy(model, processor, test, builtin.TEMPLATES[name])
        chance = 1.0 / test.features["label"].num_classes
        print(
            f"zero-shot {name:>9s} test: {100 * accuracy[name]:5.1f}%  (chance {100 * chance:.1f}%, {len(test)} images)"
        )

    pretrain.save(model, processor, args.output_dir)
    losses = stats.pop("losses")
    record = {
        "command": "python examples/pretrain_builtin.py",
        "args": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretraining": stats,
        "loss_every_100_steps": [
            round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)
        ],
        "zero_shot_test_accuracy": accuracy,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.output_dir, "pretraining.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
