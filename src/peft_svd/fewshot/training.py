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
import pickle
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

from ..errors import PeftSVDWarning
from .record import RunRecord
from .zeroshot import check_dual_encoder, encode_images, encode_text, logit_scale

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
_ADAPTER_FILE = "adapter_model_{}.safetensors"
_RUN_FILE = "fewshot_run.json"
# What `accelerator.save_state` writes for one model, optimizer and scheduler, besides our adapter file
# (one random_states_<i>.pkl per process; process 0's is always there).
_ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from: a file is missing, truncated or not what this script
    writes. The message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); nothing of it is left behind. The
    message names the folder and the cause."""


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
    saving leaves no half-written checkpoint behind (and a failed or interrupted save removes it).
    Must be called on every process.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointWriteError: a write failed on some process (a full disk); raised on every process.
    """
    final = os.path.join(checkpoint_root, f"{CHECKPOINT_PREFIX}{step}")
    partial = os.path.join(checkpoint_root, f".{CHECKPOINT_PREFIX}{step}.partial")

    def start():
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)

    def finish():
        with open(os.path.join(partial, _RUN_FILE), "w") as f:
            json.dump({"step": step, "run": run.to_dict() if run is not None else {}}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)

    # Every process takes part in each stage and learns whether any failed, so that a failure on one
    # (a full disk) ends all of them with the same error instead of leaving the others waiting.
    try:
        _together(accelerator, start if accelerator.is_main_process else None, partial)
        _together(accelerator, lambda: accelerator.save_state(partial), partial)
        _together(accelerator, finish if accelerator.is_main_process else None, partial)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def write_error_cause(exc: BaseException) -> str:
    """Returns one line saying why a write failed: `<file>: <reason>` for an OSError that names its
    file, else the first line of the error."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _together(accelerator, work, folder: str) -> None:
    """Runs `work` (or nothing, for None) on this process, then raises `CheckpointWriteError` on
    every process if it raised OSError on any."""
    from accelerate.utils import gather_object
    from safetensors import SafetensorError

    error = None
    if work is not None:
        try:
            work()
        except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save and safetensors report a full disk as these
            error = f"cannot write checkpoint {folder} ({write_error_cause(exc)})"
    errors = gather_object([error]) if accelerator.num_processes > 1 else [error]
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointWriteError(first)


def checkpoints_to_write(num_steps: int, start_step: int, checkpointing_steps: int | None) -> int:
    """Returns how many checkpoints `train` saves for these arguments (every `checkpointing_steps`
    steps after `start_step`, not after the last step)."""
    if not checkpointing_steps:
        return 0
    return max(0, (num_steps - 1) // checkpointing_steps - start_step // checkpointing_steps)


def _checkpoints(checkpoint_root: str) -> list[str]:
    """Returns the complete (renamed) checkpoint folders under `checkpoint_root`, most steps first."""
    if not os.path.isdir(checkpoint_root):
        return []
    steps = [
        (int(m.group(1)), name)
        for name in os.listdir(checkpoint_root)
        if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)) and os.path.isdir(os.path.join(checkpoint_root, name))
    ]
    return [os.path.join(checkpoint_root, name) for _, name in sorted(steps, reverse=True)]


def latest_checkpoint(checkpoint_root: str) -> str | None:
    """Returns the complete checkpoint with the most steps under `checkpoint_root`, or None."""
    found = _checkpoints(checkpoint_root)
    return found[0] if found else None


def remove_partial_checkpoints(checkpoint_root: str) -> list[str]:
    """Removes the `.step_<N>.partial` folders a run killed while saving left under `checkpoint_root`
    (never resumed from: a checkpoint is complete once renamed). Call while holding the output
    folder's lock. Returns the names removed."""
    if not os.path.isdir(checkpoint_root):
        return []
    names = [n for n in os.listdir(checkpoint_root) if re.fullmatch(rf"\.{CHECKPOINT_PREFIX}\d+\.partial", n)]
    for name in names:
        shutil.rmtree(os.path.join(checkpoint_root, name), ignore_errors=True)
    return names


def verify_checkpoint(path: str) -> int:
    """Reads every file of the checkpoint at `path` the way resuming will (the run record, the adapter,
    Accelerate's optimizer, scheduler and random states, with `weights_only` unpickling), so that a
    damaged or foreign checkpoint is found before anything loads.

    Returns:
        The number of optimisation steps it completed.

    Raises:
        CheckpointError: naming the file that is missing, truncated, or holds something other than
            tensors and plain values (a pickle with code in it).
    """
    from accelerate.utils import load as accelerate_load
    from safetensors import SafetensorError

    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a folder)")
    step = int(_read_run_file(path)["step"])
    names = set(os.listdir(path))
    for required in (_ADAPTER_FILE.format(0), *_ACCELERATE_FILES):
        if required not in names:
            raise CheckpointError(f"checkpoint {path} is incomplete: {required} is missing")
    for name in sorted(names - {_RUN_FILE}):
        file = os.path.join(path, name)
        try:
            if name.endswith(".safetensors"):
                load_file(file)
            elif name.endswith((".bin", ".pkl", ".pt")):
                accelerate_load(file, map_location="cpu")
        except (OSError, SafetensorError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"checkpoint file {file} cannot be read safely ({type(exc).__name__}: {reason[:300]})"
            ) from exc
    return step


def _read_run_file(path: str) -> dict:
    """Returns the checkpoint's `{"step": int, "run": dict}`; raises CheckpointError naming the file
    when it is missing or damaged."""
    info_path = os.path.join(path, _RUN_FILE)
    if not os.path.isfile(info_path):
        raise CheckpointError(f"{path} is not a checkpoint written by --checkpointing-steps (no {_RUN_FILE})")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        int(info["step"])
        if not isinstance(info["run"], dict):
            raise TypeError("'run' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {info_path} is damaged ({type(exc).__name__}: {exc})") from exc
    return info


def find_checkpoint(checkpoint_root: str) -> str:
    """Returns the newest checkpoint under `checkpoint_root` that `verify_checkpoint` accepts; each
    newer one it skips is named in a `PeftSVDWarning` with what is wrong with it.

    Raises:
        CheckpointError: there is no checkpoint, or none can be read (each named).
    """
    found = _checkpoints(checkpoint_root)
    if not found:
        raise CheckpointError(f"no checkpoint to resume from under {checkpoint_root}")
    problems = []
    for path in found:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            warnings.warn(
                f"resuming from {path}, the newest checkpoint that can be read; skipped: {'; '.join(problems)}",
                category=PeftSVDWarning, stacklevel=2,
            )
        return path
    raise CheckpointError(f"no checkpoint under {checkpoint_root} can be resumed from: {'; '.join(problems)}")


def read_checkpoint(path: str, run: RunRecord) -> int:
    """Checks that the checkpoint at `path` belongs to a run with the same settings as `run`.

    Returns:
        The number of optimisation steps it completed.

    Only the run record is read; `verify_checkpoint` reads the rest.

    Raises:
        CheckpointError: not a checkpoint of this script, or its run record is damaged (named).
        ValueError: written with other settings (named).
    """
    info = _read_run_file(path)
    step = int(info["step"])
    differ = run.differences(info["run"])
    if differ:
        listed = "; ".join(f"{k}: checkpoint {_short(a)}, now {_short(b)}" for k, (a, b) in differ.items())
        raise ValueError(f"checkpoint {path} was written by a run with other settings ({listed}); resume with the same flags")
    return step


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
        CheckpointError: not a checkpoint written by this script, or its run record is damaged.
    """
    return dict(_read_run_file(path)["run"])
