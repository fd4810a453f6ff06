"""The sweeps behind benchmarks/RESULTS.md's "why" (one config a line, in a JSONL file):
trains peft-svd or LoRA on a built-in task through the library's loop (K shots, seed, lr,
steps, augmentation, temperature, targeted towers, weight decay) and reports test and
validation accuracy and the accuracy on glyphs (the pretraining task) afterwards.

    python sweep.py configs.jsonl PART PARTS out.jsonl   # runs configs PART, PART + PARTS, ...

Each config is a JSON object of `run`'s keyword arguments (plus an optional "tag").
`rel: true` emulates a relative parametrisation of the change (Adam steps scaled by the
pretrained singular value, s0 * (1 + e)) by rescaling every optimiser step.
"""

import copy
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer  # noqa: E402

import peft_svd  # noqa: E402
from peft_svd import builtin  # noqa: E402
from peft_svd.fewshot import data as fsdata  # noqa: E402
from peft_svd.fewshot import templates, training  # noqa: E402
from peft_svd.fewshot.zeroshot import encode_images, encode_text, tokenize_prompts  # noqa: E402

torch.set_num_threads(1)
PATH = builtin.model_path()
TOKENIZER = AutoTokenizer.from_pretrained(PATH)
PROCESSOR = AutoImageProcessor.from_pretrained(PATH)
BASE = AutoModel.from_pretrained(PATH).eval()
_TASKS = {}


def task(name):
    """The built-in dataset `name`: data, template, preprocessed test / validation pixels, prompts."""
    if name not in _TASKS:
        d = fsdata.load_image_classification(f"builtin:{name}")
        t = {"data": d, "template": d.template or templates.template_for(d.name)}
        for split in ("test", "validation"):
            labels = d.labels(split)
            rows = fsdata.EvalSet(d.splits[split], list(range(len(labels))), labels.tolist(), PROCESSOR)
            t[split] = (torch.stack([rows[i][0] for i in range(len(rows))]), torch.as_tensor(labels))
        t["prompts"] = tokenize_prompts(TOKENIZER, templates.build_prompts(d.class_names, t["template"]))
        _TASKS[name] = t
    return _TASKS[name]


@torch.no_grad()
def accuracy(model, t, split):
    model.eval()
    x, y = t[split]
    text = encode_text(model, t["prompts"]["input_ids"], t["prompts"]["attention_mask"])
    predictions = torch.cat([(encode_images(model, x[i : i + 512]) @ text.t()).argmax(1) for i in range(0, len(x), 512)])
    return 100.0 * (predictions == y).float().mean().item()


def run(method="svd", dataset="digits", shots=4, seed=1, lr=5e-4, steps=None, iters_per_shot=50, crop=(0.5, 1.0),
        flip=False, logit_scale=None, wd=0.01, retention=("glyphs",), batch=32, rel=False, cfg_kw=None):
    t = task(dataset)
    d = t["data"]
    labels = d.labels("train")
    rows = fsdata.sample_few_shot(labels, shots, seed)
    targets = [int(labels[r]) for r in rows]
    recipe = training.FewShotRecipe(lr=lr, weight_decay=wd, iters_per_shot=iters_per_shot, max_steps=steps,
                                    batch_size=batch, crop_scale=tuple(crop))
    n = recipe.num_steps(shots, len(rows))
    torch.manual_seed(seed)
    model = copy.deepcopy(BASE)
    if logit_scale:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(logit_scale))
    if method == "lora":
        config = LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["q_proj", "k_proj", "v_proj"])
    else:
        config = peft_svd.SVDConfig(**(cfg_kw or {}))
    model = get_peft_model(model, config)
    train_set = fsdata.FewShotTrainSet(d.splits["train"], rows, targets, fsdata.TrainTransform(PROCESSOR, scale=crop, flip=flip), seed=seed)
    loader = torch.utils.data.DataLoader(train_set, sampler=fsdata.FewShotOrder(len(rows), n * batch, seed=seed), batch_size=batch)
    classifier = training.PromptClassifier(model, t["prompts"])
    optimizer = training.build_optimizer(classifier, recipe)
    schedule = training.build_scheduler(optimizer, recipe, n)
    classifier.train()
    started, losses = time.perf_counter(), []
    pairs = []
    if rel:
        pairs = [(m.svd_delta["default"], m.svd_S) for m in model.modules() if hasattr(m, "svd_delta") and "default" in m.svd_delta]
    for x, y in loader:
        loss = F.cross_entropy(classifier(x), y)
        loss.backward()
        before = [p.detach().clone() for p, _ in pairs]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        with torch.no_grad():
            for (p, s0), old in zip(pairs, before, strict=True):
                p.copy_(old + s0 * (p - old))
    out = dict(method=method, dataset=dataset, shots=shots, seed=seed, lr=lr, steps=n, crop=list(crop), flip=flip,
               logit_scale=logit_scale, wd=wd, rel=rel, cfg_kw=cfg_kw, test=accuracy(model, t, "test"),
               val=accuracy(model, t, "validation"), final_loss=float(np.mean(losses[-10:])), train_s=time.perf_counter() - started)
    for other in retention:
        if other != dataset:
            out["ret_" + other] = accuracy(model, task(other), "test")
    return out


if __name__ == "__main__":
    configs = [json.loads(line) for line in open(sys.argv[1])]
    part, parts = int(sys.argv[2]), int(sys.argv[3])
    with open(sys.argv[4], "a") as f:
        for i, config in enumerate(configs):
            if i % parts != part:
                continue
            tag = config.pop("tag", "")
            result = {**run(**config), "tag": tag}
            print(json.dumps(result), flush=True)
            f.write(json.dumps(result) + "\n")
            f.flush()
