"""One run of the quality benchmark (`benchmarks/quality.py`), in whichever process runs it.

A run is a dict (`Run`'s fields, JSON-able) naming a dataset, a protocol, a method, K, a seed
and a learning rate; `execute(run)` adapts a fresh copy of the base model (or fits a probe or a
cache model on frozen features) and returns the run's record: test accuracy (or base / novel /
harmonic mean), validation accuracy (what learning rates are picked on), accuracy on the
retention datasets for methods that change the model, steps, losses and times.

Each process holds one `Worker`: the base model, loaded once, and every dataset it has met,
with the preprocessed pixels of its evaluation splits kept in memory where they are small, so
that evaluating costs only forward passes. `quality.py --jobs N` starts N such processes, each
with one intra-op thread.
"""

import copy
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import fewshot_baselines as baselines
import peft_svd
from peft_svd.fewshot import data as fsdata
from peft_svd.fewshot import templates, training
from peft_svd.fewshot.zeroshot import encode_images, encode_text, logit_scale, tokenize_prompts

# Methods that train through the library's loop, and so change the model (retention is measured
# for them; the linear probe and Tip-Adapter-F leave the encoders as they are).
TRAINED = ("lora", "svd", "coop")

# The methods' published recipes.
LORA_RECIPE = dict(lr=2e-4, weight_decay=0.01, iters_per_shot=500)  # CLIP-LoRA: r=2, q/k/v, 500 x K
SVD_RECIPE = dict(lr=5e-4, weight_decay=0.01, iters_per_shot=200)  # CLIP-SVD, natural images
SVD_BASE_TO_NOVEL = dict(lr=4e-4, weight_decay=0.01, epochs=20)  # CLIP-SVD, base-to-novel (10-20 epochs)
LORA_CONFIG = dict(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["q_proj", "k_proj", "v_proj"])
PAPER_LR = {
    "svd": SVD_RECIPE["lr"],
    "lora": LORA_RECIPE["lr"],
    "coop": baselines.COOP_RECIPE["lr"],
    "tip-adapter-f": baselines.TIP_RECIPE["lr"],
}

PROBE_C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
PROBE_ONE_SHOT_C = 10.0  # K = 1 leaves nothing to cross-validate on: the middle of the grid
PROBE_MAX_FOLDS = 4
_CACHE_LIMIT_BYTES = 512 * 2**20  # evaluation pixels kept in memory per split up to this size


@dataclass
class DatasetSpec:
    """A dataset of the benchmark and how to read it (the few-shot script's dataset flags).

    `template` / `augment` None: the dataset's own (built-in datasets ship both), else the
    paper's template for a known dataset name and the natural-image augmentation.
    """

    source: str
    template: str | None = None
    class_names: list[str] | None = None
    image_column: str | None = None
    label_column: str | None = None
    config: str | None = None
    augment: str = "auto"
    base_to_novel: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Run:
    """What one run is: its identity (`key`) and the recipe it trains with."""

    dataset: str  # the DatasetSpec's source
    protocol: str  # "few-shot" or "base-to-novel"
    method: str
    shots: int
    seed: int
    lr: float | None = None  # None for methods without one (linear probe)
    epochs: float | None = None  # run length in epochs over the K-shot set instead of the recipe's
    iters_scale: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    logit_scale: float | None = None
    compile: bool = False
    retention: list[str] = field(default_factory=list)

    def key(self) -> tuple:
        return (self.dataset, self.protocol, self.method, self.shots, self.seed, self.lr, self.epochs)


def run_key(record: dict) -> tuple:
    """The identity of a run's record: (dataset, protocol, method, shots, seed, lr, epochs);
    records written before runs had `epochs` read as None (the recipe's)."""
    return (record["dataset"], record["protocol"], record["method"], record["shots"], record["seed"], record.get("lr"),
            record.get("epochs"))


def harmonic_mean(base: float, novel: float) -> float:
    """The base-to-novel score: the harmonic mean of base and novel accuracy (0 if both are 0)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def training_recipe(run: Run) -> training.FewShotRecipe | None:
    """Returns the optimisation recipe of a trained run (lr, weight decay, steps), None for
    methods that do not train through the library's loop. The augmentation is set later, from
    the dataset."""
    if run.method == "svd" and run.protocol == "base-to-novel":
        r = dict(SVD_BASE_TO_NOVEL)  # counted in epochs, not scaled
    elif run.method == "svd":
        r = dict(SVD_RECIPE, iters_per_shot=max(1, round(SVD_RECIPE["iters_per_shot"] * run.iters_scale)))
    elif run.method == "lora":
        r = dict(LORA_RECIPE, iters_per_shot=max(1, round(LORA_RECIPE["iters_per_shot"] * run.iters_scale)))
    elif run.method == "coop":
        r = dict(lr=baselines.COOP_RECIPE["lr"], weight_decay=baselines.COOP_RECIPE["weight_decay"],
                 epochs=baselines.coop_epochs(run.shots) * run.iters_scale)
    else:
        return None
    r["lr"] = run.lr
    if run.epochs is not None:
        r.pop("iters_per_shot", None)
        r["epochs"] = run.epochs
    return training.FewShotRecipe(**r, max_steps=run.max_steps, batch_size=run.batch_size)


def planned_steps(run: Run, num_classes: int) -> int:
    """Estimated optimisation steps of a run (for progress and scheduling; exact unless some
    class has fewer than K training images)."""
    recipe = training_recipe(run)
    if recipe is None:
        return 50 if run.method == "tip-adapter-f" else 1
    classes = math.ceil(num_classes / 2) if run.protocol == "base-to-novel" else num_classes
    return recipe.num_steps(run.shots, run.shots * classes)


class Task:
    """A dataset loaded once per process: splits, template, augmentation, cached pixels."""

    def __init__(self, spec: DatasetSpec, image_processor, device):
        self.spec = spec
        self.data = fsdata.load_image_classification(
            spec.source, image_column=spec.image_column, label_column=spec.label_column,
            class_names=spec.class_names, config_name=spec.config,
        )
        self.name = self.data.name
        self.template = templates.check_template(spec.template) if spec.template else (
            self.data.template or templates.template_for(self.data.name)
        )
        self.augmentation = fsdata.augmentation_for(self.data, spec.augment)
        self.train_split, _ = self.data.split(None, purpose="training", fallbacks=("train",))
        self.test_split, _ = self.data.split(None, purpose="evaluation", fallbacks=("test",))
        self.val_split = "validation" if "validation" in self.data.splits else None
        self.train_labels = self.data.labels(self.train_split)
        self.image_processor, self.device = image_processor, device
        self._pixels = {}

    def pixels(self, split: str, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pixel_values (images, 3, H, W), labels (images,)) of `rows` of `split` (all by
        default), preprocessed as for evaluation; whole splits are kept if small."""
        labels = self.data.labels(split)
        whole = rows is None
        if whole and split in self._pixels:
            return self._pixels[split]
        rows = list(range(len(labels))) if whole else list(rows)
        subset = fsdata.EvalSet(self.data.splits[split], rows, labels[rows].tolist(), self.image_processor)
        pixels = torch.stack([subset[i][0] for i in range(len(subset))]) if rows else torch.empty(0)
        out = (pixels, torch.as_tensor(labels[rows]))
        if whole and pixels.numel() * pixels.element_size() <= _CACHE_LIMIT_BYTES:
            self._pixels[split] = out
        return out

    def prompts(self, classes=None) -> list[str]:
        names = self.data.class_names if classes is None else [self.data.class_names[c] for c in classes]
        return templates.build_prompts(names, self.template)


@torch.no_grad()
def image_features(model, pixels: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """Returns normalised image features (images, dim) of `model` for `pixels`, in batches."""
    model.eval()
    parts = [encode_images(model, pixels[i : i + batch_size].to(device)).float() for i in range(0, len(pixels), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0)


@torch.no_grad()
def accuracy(model, tokenizer, task: Task, split: str, *, classes=None, text=None, device="cpu") -> float:
    """Top-1 accuracy (%) of `model`'s zero-shot head on `split` of `task`, over `classes` (all
    by default; targets re-indexed). `text`: normalised class features (classes, dim) to use
    instead of encoding the task's prompts (prompt learning)."""
    pixels, labels = task.pixels(split)
    if classes is not None:
        keep = torch.isin(labels, torch.as_tensor(classes))
        position = {c: i for i, c in enumerate(classes)}
        pixels, labels = pixels[keep], torch.as_tensor([position[int(c)] for c in labels[keep]])
    if text is None:
        tokens = tokenize_prompts(tokenizer, task.prompts(classes))
        text = encode_text(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float()
    predictions = (image_features(model, pixels, device) @ text.t()).argmax(1).cpu()
    return 100.0 * float((predictions == labels).float().mean())


class Worker:
    """The state of one process of the benchmark: accelerator, base model, loaded tasks."""

    def __init__(self, model_name: str, specs: list[DatasetSpec], threads: int | None = None):
        from accelerate import Accelerator, DataLoaderConfiguration
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.accelerator = Accelerator(mixed_precision="no", dataloader_config=DataLoaderConfiguration(split_batches=True))
        self.device = self.accelerator.device
        self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        self.image_processor = AutoImageProcessor.from_pretrained(model_name)
        self.base = AutoModel.from_pretrained(model_name).to(self.device).eval()
        self.specs = {s.source: s for s in specs}
        self.progress_bar = True
        self._tasks = {}

    def task(self, source: str) -> Task:
        if source not in self._tasks:
            spec = self.specs.get(source) or DatasetSpec(source)
            self._tasks[source] = Task(spec, self.image_processor, self.device)
        return self._tasks[source]

    def execute(self, run: Run) -> dict:
        """Does one run; returns its record (the run's fields and its results)."""
        started = time.perf_counter()
        record = {**asdict(run), "dataset_name": self.task(run.dataset).name}
        if run.method == "zero-shot":
            record.update(self._zero_shot(run))
        elif run.method == "linear-probe":
            record.update(self._linear_probe(run))
        elif run.method == "tip-adapter-f":
            record.update(self._tip_adapter(run))
        elif run.method in TRAINED:
            record.update(self._train(run))
        else:
            raise ValueError(f"unknown method {run.method!r}")
        record["wall_s"] = time.perf_counter() - started
        return record

    # -- methods ---------------------------------------------------------------------------

    def _scores(self, model, task: Task, protocol: str, text_for=None) -> dict:
        """Test (and validation) accuracy of `model` for a protocol. `text_for(classes)` gives
        class features for prompt learning."""
        def acc(split, classes=None):
            text = text_for(task, classes) if text_for else None
            return accuracy(model, self.tokenizer, task, split, classes=classes, text=text, device=self.device)

        if protocol == "base-to-novel":
            base, novel = fsdata.base_novel_classes(task.data.num_classes)
            b, n = acc(task.test_split, base), acc(task.test_split, novel)
            out = {"base": b, "novel": n, "hm": harmonic_mean(b, n)}
            if task.val_split:  # what a base-to-novel schedule is picked on
                vb, vn = acc(task.val_split, base), acc(task.val_split, novel)
                out.update(val_base=vb, val_novel=vn, val_hm=harmonic_mean(vb, vn))
            return out
        out = {"accuracy": acc(task.test_split)}
        if task.val_split:
            out["val_accuracy"] = acc(task.val_split)
        return out

    def _zero_shot(self, run: Run) -> dict:
        return self._scores(self.base, self.task(run.dataset), run.protocol)

    def _shots(self, task: Task, run: Run) -> tuple[list[int], list[int], list[int]]:
        """(classes trained on, K-shot rows, their targets as positions in those classes)."""
        if run.protocol == "base-to-novel":
            classes, _ = fsdata.base_novel_classes(task.data.num_classes)
        else:
            classes = list(range(task.data.num_classes))
        rows = fsdata.sample_few_shot(task.train_labels, run.shots, run.seed, classes=classes)
        position = {c: i for i, c in enumerate(classes)}
        return classes, rows, [position[int(task.train_labels[r])] for r in rows]

    def _linear_probe(self, run: Run) -> dict:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score

        task = self.task(run.dataset)
        _, rows, _ = self._shots(task, run)
        x = image_features(self.base, task.pixels(task.train_split, rows)[0], self.device).cpu().numpy()
        y = task.train_labels[rows]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if run.shots >= 2:
                folds = StratifiedKFold(n_splits=min(run.shots, PROBE_MAX_FOLDS), shuffle=True, random_state=run.seed)
                scores = [cross_val_score(LogisticRegression(C=c, max_iter=2000), x, y, cv=folds).mean() for c in PROBE_C_GRID]
                c = PROBE_C_GRID[int(np.argmax(scores))]  # the smallest C among equals
            else:
                c = PROBE_ONE_SHOT_C
            probe = LogisticRegression(C=c, max_iter=2000).fit(x, y)
        out = {"C": c, "train_images": len(rows)}
        for key, split in (("accuracy", task.test_split), ("val_accuracy", task.val_split)):
            if split:
                px, labels = task.pixels(split)
                features = image_features(self.base, px, self.device).cpu().numpy()
                out[key] = 100.0 * float((probe.predict(features) == labels.numpy()).mean())
        return out

    def _augmented_features(self, task: Task, rows, targets, seed: int, views: int) -> list[torch.Tensor]:
        """Normalised base-model features of `views` augmented passes over the K-shot images
        (list of (shots, dim)); the crops are a function of (seed, pass, image)."""
        aug = task.augmentation
        transform = fsdata.TrainTransform(self.image_processor, scale=aug.crop_scale, flip=aug.flip)
        dataset = fsdata.FewShotTrainSet(task.data.splits[task.train_split], rows, targets, transform, seed=seed, cache_images=True)
        out = []
        for v in range(views):
            pixels = torch.stack([dataset[(i, v * len(rows) + i)][0] for i in range(len(rows))])
            out.append(image_features(self.base, pixels, self.device))
        return out

    def _tip_adapter(self, run: Run) -> dict:
        task = self.task(run.dataset)
        if task.val_split is None:
            raise ValueError(f"Tip-Adapter-F picks alpha and beta on a validation split; {task.name} has none")
        _, rows, targets = self._shots(task, run)
        r = baselines.TIP_RECIPE
        views = self._augmented_features(task, rows, targets, run.seed, r["augment_views"] + r["epochs"])
        keys = F.normalize(torch.stack(views[: r["augment_views"]]).mean(0), dim=-1)
        labels = torch.as_tensor(targets, device=self.device)
        tokens = tokenize_prompts(self.tokenizer, task.prompts())
        with torch.no_grad():
            text = encode_text(self.base, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)).float()
        adapter = baselines.TipAdapterF(keys, labels, text, float(logit_scale(self.base).detach()))
        generator = torch.Generator().manual_seed(run.seed)
        started = time.perf_counter()
        loss = adapter.fit(views[r["augment_views"] :], labels, lr=run.lr, eps=r["eps"], batch_size=r["batch_size"], generator=generator)
        train_s = time.perf_counter() - started
        val_px, val_labels = task.pixels(task.val_split)
        alpha, beta, val = adapter.search(image_features(self.base, val_px, self.device), val_labels.to(self.device))
        test_px, test_labels = task.pixels(task.test_split)
        with torch.no_grad():
            predictions = adapter.logits(image_features(self.base, test_px, self.device)).argmax(1).cpu()
        return {
            "accuracy": 100.0 * float((predictions == test_labels).float().mean()),
            "val_accuracy": val, "alpha": alpha, "beta": beta, "final_loss": loss, "train_s": train_s,
            "steps": r["epochs"] * math.ceil(len(rows) / r["batch_size"]), "train_images": len(rows),
        }

    def _train(self, run: Run) -> dict:
        """Adapts a fresh copy of the base model with LoRA, SVD or CoOp through the library's
        training loop (K-shot sampling, data order, augmentation, loss), then evaluates it."""
        from accelerate.utils import set_seed
        from peft import LoraConfig

        from peft_svd.fewshot.models import adapt

        task = self.task(run.dataset)
        classes, rows, targets = self._shots(task, run)
        recipe = training_recipe(run)
        aug = task.augmentation
        recipe.augmentation, recipe.crop_scale, recipe.flip = aug.name, aug.crop_scale, aug.flip
        num_steps = recipe.num_steps(run.shots, len(rows))

        set_seed(run.seed)  # LoRA's initialisation and dropout, CoOp's context
        model = copy.deepcopy(self.base)
        if run.logit_scale is not None:
            with torch.no_grad():
                model.logit_scale.fill_(math.log(run.logit_scale))
        if run.method == "coop":
            names = [task.data.class_names[c] for c in classes]
            classifier = baselines.CoOpClassifier(model, self.tokenizer, names, n_ctx=baselines.COOP_RECIPE["n_ctx"],
                                                  init_std=baselines.COOP_RECIPE["init_std"]).to(self.device)
            optimizer, scheduler = baselines.coop_optimizer_and_schedule(
                classifier, lr=recipe.lr, num_steps=num_steps, steps_per_epoch=math.ceil(len(rows) / recipe.batch_size)
            )
            trainable = classifier.ctx.numel()
        else:
            config = LoraConfig(**LORA_CONFIG) if run.method == "lora" else peft_svd.SVDConfig()
            model = adapt(model, config)
            trainable, _ = model.get_nb_trainable_parameters()
            classifier = training.PromptClassifier(model, tokenize_prompts(self.tokenizer, task.prompts(classes)))
            optimizer = training.build_optimizer(classifier, recipe)
            scheduler = training.build_scheduler(optimizer, recipe, num_steps)
        train_set = fsdata.FewShotTrainSet(
            task.data.splits[task.train_split], rows, targets,
            fsdata.TrainTransform(self.image_processor, scale=recipe.crop_scale, flip=recipe.flip),
            seed=run.seed, cache_images=True,
        )
        loader = torch.utils.data.DataLoader(
            train_set, sampler=fsdata.FewShotOrder(len(rows), num_steps * recipe.batch_size, seed=run.seed),
            batch_size=recipe.batch_size,
        )
        acc = self.accelerator
        trained = classifier
        if run.compile:
            trained = torch.compile(classifier)
        trained, optimizer, loader, scheduler = acc.prepare(trained, optimizer, loader, scheduler)
        stats = training.train(acc, trained, optimizer, scheduler, loader, num_steps=num_steps, progress_bar=self.progress_bar)
        acc.free_memory()  # drop the accelerator's references to this run's objects

        started = time.perf_counter()
        text_for = None
        if run.method == "coop":
            def text_for(t, cls):
                names = t.data.class_names if cls is None else [t.data.class_names[c] for c in cls]
                tokens = classifier.prompt_tokens(names)
                with torch.no_grad():
                    return classifier.text_features(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)).float()
        out = self._scores(classifier.model, task, run.protocol, text_for)
        retention = {}
        for source in run.retention:
            other = self.task(source)
            text = text_for(other, None) if text_for else None
            retention[other.name] = accuracy(classifier.model, self.tokenizer, other, other.test_split, text=text, device=self.device)
        return {
            **out,
            **({"retention_accuracy": retention} if retention else {}),
            "steps": stats.steps, "train_images": len(rows), "final_loss": stats.final_loss, "mean_loss": stats.mean_loss,
            "train_s": stats.wall_time_s, "step_s": stats.wall_time_s / stats.steps, "eval_s": time.perf_counter() - started,
            "trainable_parameters": trainable, "augmentation": aug.to_dict(),
        }


_WORKER: Worker | None = None


def init_worker(model_name: str, specs: list[dict], threads: int | None) -> None:
    """Initialiser of a benchmark process: one thread (on a shared CPU one is fastest), no
    progress bars (the parent shows one), the base model loaded once."""
    global _WORKER
    os.environ["TQDM_DISABLE"] = "1"
    _WORKER = Worker(model_name, [DatasetSpec(**s) for s in specs], threads)
    _WORKER.progress_bar = False


def execute(run: dict) -> dict:
    """Runs one run (a `Run` as a dict) in this process's worker; returns its record."""
    if _WORKER is None:
        raise RuntimeError("init_worker was not called in this process")
    return _WORKER.execute(Run(**run))
