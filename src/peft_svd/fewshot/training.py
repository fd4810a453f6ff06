"""Few-shot training: the recipe, the module trained, the loop, and checkpoints.

The module trained is `PromptClassifier`: CLIP scoring a batch of images against every class
prompt, the prompts re-encoded (with gradients) at each step because both encoders are adapted.
With several processes each process can encode only its share of the prompts; the features are
then all-gathered with a gradient that routes each process's share back to it
(`shard_prompts=True`), which divides the text-side cost by the process count and leaves the
result unchanged.
"""

import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .record import RunRecord
from .zeroshot import check_dual_encoder, encode_images, encode_text, logit_scale

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
_ADAPTER_FILE = "adapter_model_{}.safetensors"
_RUN_FILE = "fewshot_run.json"


@dataclass
class FewShotRecipe:
    """Optimisation recipe of few-shot adaptation. Defaults are the CLIP-SVD paper's recipe for
    natural images.

    Attributes:
        lr: peak learning rate of AdamW.
        weight_decay: AdamW decoupled weight decay on the trained parameters (for the SVD tuner,
            the change of the singular values, so decay pulls toward the pretrained model).
        min_lr: learning rate at the end of the cosine schedule.
        iters_per_shot: optimisation steps per shot; a run has `iters_per_shot * shots` steps.
        epochs: if set, the run has `ceil(epochs * train_images / batch_size)` steps instead
            (the biomedical and base-to-novel recipes are given in epochs).
        max_steps: cap on the number of steps; the cosine schedule spans the capped run.
        batch_size: images per optimisation step, over all processes and accumulation steps.
        gradient_accumulation_steps: micro-batches per optimisation step.
        augmentation: name of the training augmentation (a key of `data.AUGMENTATIONS`, or
            "custom"); `crop_scale` and `flip` are its parts (see `data.augmentation_for`).
        crop_scale: area range of RandomResizedCrop.
        flip: random horizontal flip.
        betas, eps: AdamW's.
    """

    lr: float = 5e-4
    weight_decay: float = 0.01
    min_lr: float = 1e-6
    iters_per_shot: int = 200
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    augmentation: str = "natural"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    betas: tuple[float, float] = field(default=(0.9, 0.999))
    eps: float = 1e-8

    def num_steps(self, shots: int, train_images: int) -> int:
        """Returns the number of optimisation steps of a run with `shots` shots and
        `train_images` images in the K-shot set."""
        if self.epochs is not None:
            steps = math.ceil(self.epochs * train_images / self.batch_size)
        else:
            steps = self.iters_per_shot * shots
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        if steps < 1:
            raise ValueError(f"the run has {steps} optimisation steps; raise --iters-per-shot, --epochs or --max-steps")
        return steps

    def micro_batch_size(self, num_processes: int) -> int:
        """Returns the images one process handles per forward pass; raises ValueError unless the
        batch divides evenly over accumulation steps and processes (needed for a result that does
        not depend on the process count)."""
        parts = self.gradient_accumulation_steps * num_processes
        if self.batch_size < 1 or self.batch_size % parts:
            raise ValueError(
                f"--batch-size {self.batch_size} must be a multiple of gradient_accumulation_steps x processes "
                f"= {self.gradient_accumulation_steps} x {num_processes}"
            )
        return self.batch_size // parts

    def to_dict(self) -> dict:
        return asdict(self)


def _gather_with_gradient(local: torch.Tensor, group) -> torch.Tensor:
    """All-gathers `local` (rows, ...) from every process of `group` along dim 0, with a backward
    that hands each process the gradient of its own rows summed over the losses of all
    processes (`torch.distributed.nn.functional.all_gather`, which also works on gloo)."""
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates it in favour of a private module (`_functional_collectives`)
        # whose autograd support depends on the version; the public function is the stable one.
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
        parts = dist_nn.all_gather(local, group=group)
    return torch.cat(parts)


class PromptClassifier(torch.nn.Module):
    """CLIP scoring images against a fixed list of class prompts; the module few-shot training
    optimises.

    Args:
        model: a CLIP-style model (usually a PeftModel around CLIPModel).
        prompt_tokens: `{"input_ids", "attention_mask"}` of shape (classes, tokens), padded to
            the longest prompt (see `zeroshot.tokenize_prompts`).
        shard_prompts: encode only this process's share of the prompts and all-gather the
            features (with gradients). Only for data-parallel training over all processes of
            the default process group (`accelerator.num_processes > 1`); ignored when
            torch.distributed is not initialised.
    """

    def __init__(self, model, prompt_tokens: dict[str, torch.Tensor], *, shard_prompts: bool = False):
        super().__init__()
        check_dual_encoder(model)
        self.model = model
        self.shard_prompts = shard_prompts
        self.register_buffer("input_ids", prompt_tokens["input_ids"], persistent=False)
        self.register_buffer("attention_mask", prompt_tokens["attention_mask"], persistent=False)
        self._group = None

    @property
    def num_classes(self) -> int:
        return self.input_ids.shape[0]

    def prompt_features(self) -> torch.Tensor:
        """Returns normalised features of all class prompts, (classes, dim), with gradients."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.shard_prompts and distributed):
            return encode_text(self.model, self.input_ids, self.attention_mask)
        if self._group is None:
            # A group of our own, so that the gather's collectives can never interleave with
            # DDP's gradient all-reduces on the default group.
            self._group = dist.new_group()
        world, rank = dist.get_world_size(self._group), dist.get_rank(self._group)
        classes = self.num_classes
        share = math.ceil(classes / world)
        # The last shares are padded with repeats of the last prompt (dropped after the gather),
        # because all_gather needs equal shapes.
        index = torch.arange(rank * share, (rank + 1) * share, device=self.input_ids.device).clamp(max=classes - 1)
        ids, mask = self.input_ids[index], self.attention_mask[index]
        used = mask.bool().any(0)  # drop padding columns that no prompt of this share needs
        local = encode_text(self.model, ids[:, used], mask[:, used])
        return _gather_with_gradient(local, self._group)[:classes]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Returns logits `logit_scale * cos(image, prompt)`, shape (batch, classes), from
        pixel_values (batch, 3, H, W)."""
        images = encode_images(self.model, pixel_values)
        prompts = self.prompt_features()
        return logit_scale(self.model) * images @ prompts.t()


def build_optimizer(model: torch.nn.Module, recipe: FewShotRecipe) -> torch.optim.AdamW:
    """Returns AdamW over the parameters of `model` that require gradients.

    Raises ValueError if there are none (the model was not adapted)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; wrap it with get_peft_model first")
    return torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps, weight_decay=recipe.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: FewShotRecipe, num_steps: int):
    """Returns the cosine schedule from `recipe.lr` to `recipe.min_lr` over `num_steps`
    optimisation steps, to be stepped once per step."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_steps, eta_min=recipe.min_lr)


def _peft_model_of(model: torch.nn.Module):
    """Returns the PeftModel that `model` (a PeftModel, or a module holding one as `.model` such
    as `PromptClassifier`) trains."""
    inner = getattr(model, "model", None)
    for candidate in (model, inner):
        if candidate is not None and hasattr(candidate, "peft_config"):
            return candidate
    raise ValueError(f"{type(model).__name__} holds no PeftModel; wrap the model with get_peft_model first")


def checkpoint_trainable_parameters_only(accelerator) -> None:
    """Makes `accelerator.save_state` / `load_state` store only the adapter of the prepared
    models (PEFT's `get_peft_model_state_dict` / `set_peft_model_state_dict`), not the frozen
    base model.

    Call once, after `accelerator.prepare`. Every prepared model must be a PeftModel or hold one
    as `.model` (`PromptClassifier`).
    """

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                peft_model = _peft_model_of(accelerator.unwrap_model(model))
                state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(output_dir, _ADAPTER_FILE.format(i)))
        weights.clear()  # nothing else of the models is written

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            peft_model = _peft_model_of(accelerator.unwrap_model(model))
            path = os.path.join(input_dir, _ADAPTER_FILE.format(i))
            if not os.path.exists(path):
                raise ValueError(f"checkpoint {input_dir} has no {os.path.basename(path)}; it was not written by this version of the script")
            state = load_file(path)
            expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
            if set(state) != expected:
                missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ValueError(
                    f"checkpoint {input_dir} holds another adapter than this run's "
                    f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                    f"{'...' if len(unexpected) > 3 else ''}); resume with the same model and adapter settings"
                )
            set_peft_model_state_dict(peft_model, state)
        models.clear()  # loaded here; accelerate must not look for model files

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, checkpoint_root: str, step: int, run: RunRecord | None) -> str:
    """Saves the training state after `step` optimisation steps to `<checkpoint_root>/step_<step>`.

    The state is written to a temporary folder and renamed when complete, so a run killed while
    saving leaves no half-written checkpoint behind. Must be called on every process.

    Returns:
        The checkpoint folder.
    """
    final = os.path.join(checkpoint_root, f"{CHECKPOINT_PREFIX}{step}")
    partial = os.path.join(checkpoint_root, f".{CHECKPOINT_PREFIX}{step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(partial, _RUN_FILE), "w") as f:
            json.dump({"step": step, "run": run.to_dict() if run is not None else {}}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(checkpoint_root: str) -> str | None:
    """Returns the complete checkpoint with the most steps under `checkpoint_root`, or None."""
    if not os.path.isdir(checkpoint_root):
        return None
    steps = [
        (int(m.group(1)), name)
        for name in os.listdir(checkpoint_root)
        if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)) and os.path.isdir(os.path.join(checkpoint_root, name))
    ]
    return os.path.join(checkpoint_root, max(steps)[1]) if steps else None


def read_checkpoint(path: str, run: RunRecord) -> int:
    """Checks that the checkpoint at `path` belongs to a run with the same settings as `run`.

    Returns:
        The number of optimisation steps it completed.

    Raises:
        ValueError: not a checkpoint of this script, or written with other settings (named).
    """
    info_path = os.path.join(path, _RUN_FILE)
    if not os.path.isfile(info_path):
        raise ValueError(f"{path} is not a checkpoint written by --checkpointing-steps (no {_RUN_FILE})")
    with open(info_path) as f:
        info = json.load(f)
    differ = run.differences(info["run"])
    if differ:
        listed = "; ".join(f"{k}: checkpoint {_short(a)}, now {_short(b)}" for k, (a, b) in differ.items())
        raise ValueError(f"checkpoint {path} was written by a run with other settings ({listed}); resume with the same flags")
    return int(info["step"])


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class TrainingStats:
    """What a training run did: optimisation steps done (in total and in this call), mean loss
    of the last step and over the steps of this call (averaged over processes), and wall time
    of this call in seconds."""

    steps: int
    steps_this_run: int
    final_loss: float
    mean_loss: float
    wall_time_s: float


def train(
    accelerator,
    classifier,
    optimizer,
    scheduler,
    train_loader,
    *,
    num_steps: int,
    start_step: int = 0,
    checkpointing_steps: int | None = None,
    checkpoint_root: str | None = None,
    run: RunRecord | None = None,
    progress_bar: bool = True,
) -> TrainingStats:
    """Runs the optimisation steps `start_step + 1 .. num_steps`.

    Every object must come from `accelerator.prepare`; `train_loader` yields
    `(pixel_values, targets)` micro-batches, `gradient_accumulation_steps` per step, and holds
    exactly `num_steps` steps of data (see `data.FewShotOrder`). Each micro-batch: logits from
    `classifier`, cross-entropy, backward; the optimiser and the per-step cosine schedule advance
    once per step. The progress bar (main process, unless `progress_bar=False`) shows the loss
    of this process's share of the batch. When `checkpointing_steps` is set the state is saved every that many steps
    (not after the last: the final adapter is saved by the caller).

    Returns:
        TrainingStats.
    """
    accumulation = accelerator.gradient_accumulation_steps
    loader = accelerator.skip_first_batches(train_loader, start_step * accumulation) if start_step else train_loader
    classifier.train()
    progress = tqdm(
        total=num_steps, initial=start_step, desc="training", dynamic_ncols=True,
        disable=not (progress_bar and accelerator.is_local_main_process),
    )
    step, started = start_step, time.perf_counter()
    report_every = max(1, num_steps // 100)
    step_loss = torch.zeros((), device=accelerator.device)
    loss_sum = torch.zeros((), device=accelerator.device)
    last_loss = torch.zeros((), device=accelerator.device)
    for pixel_values, targets in loader:
        with accelerator.accumulate(classifier):
            logits = classifier(pixel_values)
            loss = F.cross_entropy(logits.float(), targets)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach() / accumulation
        if not accelerator.sync_gradients:
            continue
        step += 1
        loss_sum += step_loss
        last_loss = step_loss
        step_loss = torch.zeros((), device=accelerator.device)
        progress.update(1)
        if step % report_every == 0 or step == num_steps:  # .item() waits for the device: not every step
            progress.set_postfix(loss=f"{last_loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        if checkpointing_steps and step % checkpointing_steps == 0 and step < num_steps:
            if checkpoint_root is None:
                raise ValueError("checkpointing_steps needs checkpoint_root")
            save_checkpoint(accelerator, checkpoint_root, step, run)
        if step >= num_steps:
            break
    progress.close()
    if step != num_steps:
        raise RuntimeError(f"the training data ran out after {step} of {num_steps} steps")
    done = step - start_step
    final_loss = accelerator.reduce(last_loss, reduction="mean").item()
    mean_loss = (accelerator.reduce(loss_sum, reduction="mean") / max(done, 1)).item()
    return TrainingStats(
        steps=step, steps_this_run=done, final_loss=final_loss, mean_loss=mean_loss, wall_time_s=time.perf_counter() - started
    )


def checkpoint_record(path: str) -> dict:
    """Returns the `RunRecord.to_dict()` saved with the checkpoint at `path` (what the interrupted run
    measured and picked is in its `recipe`).

    Raises:
        ValueError: not a checkpoint written by this script.
    """
    info_path = os.path.join(path, _RUN_FILE)
    if not os.path.isfile(info_path):
        raise ValueError(f"{path} is not a checkpoint written by --checkpointing-steps (no {_RUN_FILE})")
    try:
        with open(info_path, encoding="utf-8") as f:
            return dict(json.load(f)["run"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{info_path} is damaged ({exc}); resume from another checkpoint") from exc
