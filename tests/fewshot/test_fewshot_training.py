import json
import math
import multiprocessing
import socket

import pytest
import torch
from peft import get_peft_model

import peft_svd
from peft_svd.fewshot.record import RunRecord
from peft_svd.fewshot.templates import build_prompts
from peft_svd.fewshot.training import (
    FewShotRecipe,
    PromptClassifier,
    build_optimizer,
    build_scheduler,
    latest_checkpoint,
    read_checkpoint,
)
from peft_svd.fewshot.zeroshot import tokenize_prompts

NAMES = ["red", "green", "blue", "dark yellow", "white"]


def test_recipe_defaults_are_the_papers():
    r = FewShotRecipe()
    assert (r.lr, r.weight_decay, r.min_lr, r.batch_size, r.crop_scale) == (5e-4, 0.01, 1e-6, 32, (0.08, 1.0))
    assert r.num_steps(shots=16, train_images=16 * 100) == 3200
    assert FewShotRecipe(max_steps=50).num_steps(16, 1600) == 50
    assert FewShotRecipe(epochs=2.5, batch_size=32).num_steps(4, 100) == math.ceil(2.5 * 100 / 32)


def test_batch_must_split_evenly_over_processes_and_accumulation():
    assert FewShotRecipe(batch_size=32, gradient_accumulation_steps=2).micro_batch_size(num_processes=4) == 4
    with pytest.raises(ValueError, match="multiple of gradient_accumulation_steps x processes = 1 x 3"):
        FewShotRecipe(batch_size=32).micro_batch_size(num_processes=3)


def test_cosine_schedule_goes_from_lr_to_min_lr_per_step():
    recipe = FewShotRecipe()
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=recipe.lr)
    scheduler = build_scheduler(optimizer, recipe, num_steps=10)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[0] == pytest.approx(5e-4)
    assert lrs[5] == pytest.approx((5e-4 + 1e-6) / 2)
    assert lrs[10] == pytest.approx(1e-6)
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_one_step_trains_the_singular_values_of_both_encoders(tiny_parts):
    model, tokenizer, _ = tiny_parts
    model = get_peft_model(model, peft_svd.SVDConfig())
    classifier = PromptClassifier(model, tokenize_prompts(tokenizer, build_prompts(NAMES, "a photo of a {}.")))
    optimizer = build_optimizer(classifier, FewShotRecipe())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in classifier.named_parameters() if "svd_delta" in n
    }
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = classifier(pixels)
    assert logits.shape == (4, len(NAMES))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    grads = {n: p.grad for n, p in classifier.named_parameters() if p.requires_grad}
    assert any("text_model" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert any("vision_model" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_model_without_trainable_parameters_is_refused(tiny_parts):
    model, _, _ = tiny_parts
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, FewShotRecipe())


def _record(**changes) -> RunRecord:
    values = dict(
        model="m", dataset="d", class_names=["cat", "dog"], train_split="train", protocol="few-shot", shots=4, seed=1,
        template="a photo of a {}.", num_steps=10, train_images=8, recipe=FewShotRecipe().to_dict(), mixed_precision="no",
    )
    return RunRecord(**{**values, **changes})


def test_checkpoint_lookup_and_settings_check(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(str(root)) is None
    for step in (2, 10, 4):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "fewshot_run.json").write_text(json.dumps({"step": step, "run": _record().to_dict()}))
    (root / ".step_12.partial").mkdir()  # an interrupted save is never picked
    latest = latest_checkpoint(str(root))
    assert latest == str(root / "step_10")
    assert read_checkpoint(latest, _record()) == 10
    with pytest.raises(ValueError, match="seed: checkpoint 1, now 2"):
        read_checkpoint(latest, _record(seed=2))
    with pytest.raises(ValueError, match="not a checkpoint"):
        read_checkpoint(str(tmp_path), _record())


@pytest.mark.parametrize(
    "change",
    [dict(class_names=["cat", "hound"]), dict(train_split="validation"), dict(mixed_precision="bf16"),
     dict(recipe={**FewShotRecipe().to_dict(), "crop_scale": (0.5, 1.0)}), dict(label_column="fine_label")],
)
def test_every_setting_of_the_record_is_checked_on_resume(tmp_path, change):
    path = tmp_path / "step_4"
    path.mkdir()
    (path / "fewshot_run.json").write_text(json.dumps({"step": 4, "run": _record().to_dict()}))
    field = next(iter(change))
    with pytest.raises(ValueError, match=f"{field}: checkpoint"):
        read_checkpoint(str(path), _record(**change))


def test_record_of_an_older_version_is_refused_by_name(tmp_path):
    path = tmp_path / "step_4"
    path.mkdir()
    old = {k: v for k, v in _record().to_dict().items() if k != "mixed_precision"}
    (path / "fewshot_run.json").write_text(json.dumps({"step": 4, "run": old}))
    with pytest.raises(ValueError, match="mixed_precision: checkpoint None, now 'no'"):
        read_checkpoint(str(path), _record())


def _sharding_worker(rank, world, port, model_dir, results):
    import torch.distributed as dist

    torch.set_num_threads(1)  # forked from a process that used OpenMP: keep to one thread
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokens = tokenize_prompts(tokenizer, build_prompts(NAMES, "a photo of a {}."))  # 5 prompts: uneven shares
        pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        targets = torch.tensor([0, 1, 2, 3, 4, 0])
        torch.manual_seed(0)
        model = get_peft_model(AutoModel.from_pretrained(model_dir), peft_svd.SVDConfig(init_weights=False))

        def grads(shard, rows):
            classifier = PromptClassifier(model, tokens, shard_prompts=shard)
            model.zero_grad()
            torch.nn.functional.cross_entropy(classifier(pixels[rows]), targets[rows]).backward()
            out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            if rows != slice(None):  # what DDP does: average the processes' gradients
                for g in out.values():
                    dist.all_reduce(g)
                    g /= world
            return out

        reference = grads(False, slice(None))
        half = slice(3 * rank, 3 * rank + 3)
        result = {"scale": max(g.abs().max().item() for g in reference.values())}
        for shard in (True, False):
            got = grads(shard, half)
            result[shard] = max((got[n] - reference[n]).abs().max().item() for n in got)
        results.put((rank, result))
    except Exception as exc:  # reported by the test, not lost in the child
        results.put((rank, repr(exc)))
    finally:
        dist.destroy_process_group()


def test_sharded_prompt_encoding_gives_the_gradients_of_one_process(tiny_clip_dir):
    """Two gloo processes, each with half of the batch: encoding only a share of the prompts and
    all-gathering the features must give the same averaged gradient as one process on the whole
    batch (and so must encoding every prompt on every process)."""
    context = multiprocessing.get_context("fork")  # the children reuse this process's imports
    results = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [context.Process(target=_sharding_worker, args=(rank, 2, port, tiny_clip_dir, results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, result in got.items():
        assert isinstance(result, dict), f"process {rank}: {result}"
        assert result["scale"] > 1e-4  # the gradients compared are not all zero
        # float32 sums in another order: 1e-5 relative (torch 2.14 lands at ~1.01e-6 absolute)
        assert result[True] < 1e-5 * max(1.0, result["scale"]), result
        assert result[False] < 1e-5 * max(1.0, result["scale"]), result
