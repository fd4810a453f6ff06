"""Two few-shot baselines of the CLIP-SVD paper's tables, written for the quality benchmark:

- `CoOpClassifier`: CoOp-style prompt learning. `n_ctx` learned context vectors take the place
  of the prompt template's words ("X X ... X <class name>."), shared by all classes; both
  encoders stay frozen, and only the context vectors are trained (through the frozen text
  encoder). Recipe of the CoOp paper (Zhou et al., IJCV 2022, few-shot setting): 16 context
  vectors drawn from N(0, 0.02), SGD lr 2e-3 with momentum 0.9 and weight decay 5e-4, one
  warm-up epoch at 1e-5, cosine decay, batch 32; 50 epochs at 1 shot, 100 at 2 and 4, 200 at 8
  and 16 (`coop_epochs`).
- `TipAdapterF`: Tip-Adapter-F (Zhang et al., ECCV 2022). A cache model whose keys are the
  L2-normalised image features of the K-shot images (averaged over 10 augmented views) and
  whose values are their one-hot labels; logits `scale * f T^T + alpha * exp(-beta (1 - f K^T)) V`.
  The keys are fine-tuned (AdamW lr 1e-3, eps 1e-4, cosine, 20 epochs of augmented features,
  batch 256), then alpha and beta are chosen on the validation split's features.

Both work on a transformers CLIP or an OpenCLIP model (the context vectors enter through a
forward hook on the text tower's token embedding, so the tower's own positional embedding,
mask and pooling apply unchanged).
"""

import math

import torch
import torch.nn.functional as F

from peft_svd.fewshot.models import model_library, text_features
from peft_svd.fewshot.zeroshot import encode_images, logit_scale, tokenize_prompts

COOP_RECIPE = dict(lr=2e-3, momentum=0.9, weight_decay=5e-4, warmup_lr=1e-5, n_ctx=16, init_std=0.02)
TIP_RECIPE = dict(lr=1e-3, eps=1e-4, epochs=20, batch_size=256, augment_views=10)
# Tip-Adapter's search of alpha (residual ratio) and beta (sharpness) on the validation split:
# beta in (0, 7], alpha in (0, 3] (the official search_scale), on a 20 x 20 grid here.
TIP_BETA_GRID = tuple(7.0 * (i + 1) / 20 for i in range(20))
TIP_ALPHA_GRID = tuple(3.0 * (i + 1) / 20 for i in range(20))
_PLACEHOLDER = "x"


def coop_epochs(shots: int) -> int:
    """Returns CoOp's number of epochs over the K-shot set: 50 at 1 shot, 100 at 2-4, 200 at 8+."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def token_embedding(model) -> torch.nn.Embedding:
    """Returns the token embedding of the text tower of a transformers CLIP or OpenCLIP model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if model_library(model) == "transformers":
        return base.text_model.embeddings.token_embedding
    tower = getattr(base, "text", base)
    embedding = getattr(tower, "token_embedding", None)
    if not isinstance(embedding, torch.nn.Embedding):
        raise TypeError(f"cannot find the token embedding of {type(base).__name__}'s text tower for prompt learning")
    return embedding


class CoOpClassifier(torch.nn.Module):
    """CLIP with learned prompt context: logits `logit_scale * cos(image, text(ctx, class name))`.

    Args:
        model: a CLIP-style model; frozen here (its parameters stop requiring gradients).
        tokenizer: its tokenizer.
        class_names: the classes to score, in target order.
        n_ctx: number of context vectors.
        init_std: standard deviation of their random initialisation.
        generator: the random generator of the initialisation.
    """

    def __init__(self, model, tokenizer, class_names, *, n_ctx=16, init_std=0.02, generator=None):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.tokenizer, self.n_ctx = tokenizer, n_ctx
        embedding = token_embedding(model)
        ctx = torch.randn(n_ctx, embedding.embedding_dim, generator=generator) * init_std
        self.ctx = torch.nn.Parameter(ctx.to(embedding.weight.device, embedding.weight.dtype))
        self._embedding = embedding
        tokens = self.prompt_tokens(class_names)
        self.register_buffer("input_ids", tokens["input_ids"], persistent=False)
        self.register_buffer("attention_mask", tokens["attention_mask"], persistent=False)

    def prompt_tokens(self, class_names) -> dict:
        """Tokenizes `"x x ... x <name>."` for each class; the n_ctx placeholders must be the
        tokens right after the start token (they are replaced by the context vectors)."""
        prompts = [" ".join([_PLACEHOLDER] * self.n_ctx) + f" {name}." for name in class_names]
        tokens = tokenize_prompts(self.tokenizer, prompts)
        ids = tokens["input_ids"][:, 1 : 1 + self.n_ctx]
        if ids.shape[1] != self.n_ctx or not bool((ids == ids[0, 0]).all()):
            raise ValueError(f"the tokenizer does not give one token per placeholder {_PLACEHOLDER!r}; cannot place the context")
        return tokens

    def _insert_context(self, module, args, output):
        if output.shape[-2] <= self.n_ctx:
            return output
        ctx = self.ctx.to(output.dtype).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], ctx, output[:, 1 + self.n_ctx :]], dim=1)

    def text_features(self, input_ids=None, attention_mask=None) -> torch.Tensor:
        """Returns normalised text features (classes, dim) of the learned prompts of `input_ids`
        (default: this classifier's classes), with gradients to the context."""
        if input_ids is None:
            input_ids, attention_mask = self.input_ids, self.attention_mask
        handle = self._embedding.register_forward_hook(self._insert_context)
        try:
            return F.normalize(text_features(self.model, input_ids, attention_mask), dim=-1)
        finally:
            handle.remove()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Returns logits (batch, classes) from pixel_values (batch, 3, H, W)."""
        with torch.no_grad():
            images = encode_images(self.model, pixel_values)
        return logit_scale(self.model).detach() * images @ self.text_features().t()


def coop_optimizer_and_schedule(classifier: CoOpClassifier, *, lr: float, num_steps: int, steps_per_epoch: int):
    """Returns (SGD over the context, LambdaLR stepped every step): CoOp's constant warm-up
    epoch at `warmup_lr`, then cosine from `lr` to 0 over the remaining steps."""
    r = COOP_RECIPE
    optimizer = torch.optim.SGD([classifier.ctx], lr=lr, momentum=r["momentum"], weight_decay=r["weight_decay"])
    warmup = min(steps_per_epoch, max(num_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return r["warmup_lr"] / lr
        progress = (step - warmup) / max(1, num_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TipAdapterF(torch.nn.Module):
    """Tip-Adapter-F on precomputed, L2-normalised features.

    Args:
        cache_keys: (shots, dim) features of the K-shot images (the mean of augmented views,
            normalised).
        cache_labels: (shots,) class positions of the K-shot images.
        text_weights: (classes, dim) normalised class-prompt features of the frozen model.
        scale: the model's logit scale.
    """

    def __init__(self, cache_keys, cache_labels, text_weights, scale: float, alpha: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.keys = torch.nn.Parameter(cache_keys.clone().float())
        self.register_buffer("values", F.one_hot(cache_labels, text_weights.shape[0]).float())
        self.register_buffer("text_weights", text_weights.float())
        self.scale, self.alpha, self.beta = float(scale), alpha, beta

    def logits(self, features: torch.Tensor, alpha: float | None = None, beta: float | None = None) -> torch.Tensor:
        """Returns (batch, classes) logits of normalised `features` (batch, dim)."""
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        affinity = features @ self.keys.t()
        cache = torch.exp(-beta * (1 - affinity)) @ self.values
        return self.scale * features @ self.text_weights.t() + alpha * cache

    def fit(self, epochs_of_features, labels: torch.Tensor, *, lr: float, eps: float, batch_size: int, generator=None):
        """Fine-tunes the keys on the augmented features of each epoch (a list of (shots, dim)
        tensors, one per epoch), AdamW with a cosine schedule stepped per batch. Returns the
        final epoch's mean loss."""
        batches = math.ceil(labels.shape[0] / batch_size)
        optimizer = torch.optim.AdamW([self.keys], lr=lr, eps=eps)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, len(epochs_of_features) * batches)
        loss_sum = 0.0
        for features in epochs_of_features:
            order = torch.randperm(labels.shape[0], generator=generator)
            loss_sum = 0.0
            for b in range(batches):
                index = order[b * batch_size : (b + 1) * batch_size]
                loss = F.cross_entropy(self.logits(features[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item()
        return loss_sum / batches

    @torch.no_grad()
    def search(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
        """Sets alpha and beta to the pair of the grids with the best accuracy on (features,
        labels) (a validation split). Returns (alpha, beta, accuracy %)."""
        best = (-1.0, self.alpha, self.beta)
        for beta in TIP_BETA_GRID:
            for alpha in TIP_ALPHA_GRID:
                accuracy = (self.logits(features, alpha, beta).argmax(1) == labels).float().mean().item()
                if accuracy > best[0]:
                    best = (accuracy, alpha, beta)
        self.alpha, self.beta = best[1], best[2]
        return self.alpha, self.beta, 100.0 * best[0]
