"""benchmarks/quality.py on a tiny CLIP and a tiny imagefolder (1 shot, 2 steps), its parts
(learning-rate selection, aggregation, targets), the baselines of benchmarks/fewshot_baselines.py,
and the data paths the benchmark uses against the library's per-image ones."""

import importlib.util
import json
import math
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "fewshot"))  # tiny_fewshot

from tiny_fewshot import write_imagefolder, write_tiny_clip  # noqa: E402

# The tiny datasets hold fewer images per class than the protocols' 16 shots, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*classes have fewer than:peft_svd.errors.PeftSVDWarning")


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return _load("quality_benchmark", "quality.py")  # puts benchmarks/ on the path for its modules


@pytest.fixture(scope="module")
def runs_module(quality):
    import quality_runs

    return quality_runs


@pytest.fixture(scope="module")
def baselines(quality):
    import fewshot_baselines

    return fewshot_baselines


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    folder = write_imagefolder(str(root / "colors"))
    write_imagefolder(str(root / "other"), seed=1)
    shutil.copytree(str(root / "other" / "test"), os.path.join(folder, "validation"))  # a validation split to pick lrs on
    return write_tiny_clip(str(root / "clip")), folder, str(root / "other")


def _args(model, dataset, other, output_dir, *extra):
    return ["--model", model, "--datasets", dataset, "--shots", "1", "--seeds", "1", "--max-steps", "2",
            "--lr-factors", "1", "4", "--select-shots", "1", "--retention", other, "--template", "a photo of a {} thing.",
            "--augment", "glyph", "--output-dir", output_dir, *extra]


@pytest.fixture(scope="module")
def smoke_run(quality, tiny, tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    out = str(tmp_path_factory.mktemp("out"))
    record = quality.main(_args(*tiny, out))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out, record


def _lora_parameter_count(model_dir, r=2):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules() if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj"))


def test_writes_json_table_and_plot(runs_module, smoke_run, tiny):
    out, record = smoke_run
    assert sorted(os.listdir(out)) == ["accuracy_vs_shots.png", "results.json", "table.md"]
    with open(os.path.join(out, "accuracy_vs_shots.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(out, "results.json")))
    runs = saved["runs"]
    few = {(r["method"], r["lr"]) for r in runs if r["protocol"] == "few-shot"}
    # every method at its paper lr and at 4x (the grid); the untrained ones once
    assert few == {("zero-shot", None), ("linear-probe", None)} | {
        (m, lr * f) for m, lr in saved["settings"]["paper_lr"].items() for f in (1.0, 4.0)
    }
    b2n = {(r["method"], r["lr"]) for r in runs if r["protocol"] == "base-to-novel"}
    assert {m for m, _ in b2n} == {"zero-shot", "lora", "svd", "coop"}  # no classifier for unseen classes otherwise
    for r in runs:
        for metric in ("accuracy", "val_accuracy") if r["protocol"] == "few-shot" else ("base", "novel", "hm"):
            assert 0.0 <= r[metric] <= 100.0, (r["method"], metric)
        if r["protocol"] == "base-to-novel":  # the validation halves too: what a schedule is picked on
            assert r["val_hm"] == pytest.approx(runs_module.harmonic_mean(r["val_base"], r["val_novel"]))
        if r["protocol"] == "base-to-novel" and r["method"] != "zero-shot":
            assert r["hm"] == pytest.approx(2 * r["base"] * r["novel"] / (r["base"] + r["novel"]) if r["base"] + r["novel"] else 0.0)
            assert r["train_images"] == 3 * 6  # first 3 of 5 classes, 16 shots of the 6 images each has
        if r["method"] in ("lora", "svd", "coop"):
            assert r["steps"] == 2 and math.isfinite(r["final_loss"])
            assert r["augmentation"] == {"name": "glyph", "crop_scale": [0.5, 1.0], "flip": False}
            if r["protocol"] == "few-shot":
                assert set(r["retention_accuracy"]) == {"other"}
    lora = next(r for r in runs if r["method"] == "lora" and r["protocol"] == "few-shot")
    assert lora["trainable_parameters"] == _lora_parameter_count(tiny[0])
    # the dataset's settings are recorded, and the calls
    assert saved["templates"] == {tiny[1]: "a photo of a {} thing."}
    assert saved["augmentations"][tiny[1]]["name"] == "glyph"
    assert len(saved["calls"]) == 1 and saved["calls"][0]["command"].startswith("python benchmarks/quality.py")
    table = open(os.path.join(out, "table.md")).read()
    assert "| colors | peft-svd, tuned lr |" in table and "| HM |" in table and "Learning rates picked" in table
    assert "template `a photo of a {} thing.`, augmentation glyph" in table


def test_learning_rate_is_picked_on_validation_never_on_test(quality, runs_module, smoke_run, tiny):
    _, record = smoke_run
    for method, sel in record["selection"][tiny[1]].items():
        grid = {r["lr"]: r for r in record["runs"] if r["method"] == method and r["protocol"] == "few-shot" and r["lr"] is not None}
        best = max(sorted(grid), key=lambda lr: grid[lr]["val_accuracy"])  # the smaller lr on a tie
        assert sel["lr"] == pytest.approx(best), method
        assert record["recipe_lrs"][f"{tiny[1]}|few-shot|{method}|tuned"] == sel["lr"]


def test_choose_learning_rates_ignores_the_test_split(quality, runs_module):
    args = quality.parse_args(["--datasets", "d", "--methods", "svd", "--lr-factors", "1", "4", "16", "--seeds", "1"])
    records = {}
    for f, val, test in ((1.0, 50.0, 90.0), (4.0, 70.0, 10.0), (16.0, 70.0, 20.0)):
        run = quality._run(args, args.specs[0], "few-shot", "svd", args.select_shots, 1, runs_module.PAPER_LR["svd"] * f)
        records[run.key()] = {"val_accuracy": val, "accuracy": test, "dataset_name": "d"}
    chosen = quality.choose_learning_rates(args, records)["d"]["svd"]
    assert chosen["factor"] == 4.0  # best validation, the smaller of the tie; the test split's best (1x) is ignored


def test_run_epochs_set_the_run_length_and_old_records_keep_their_key(runs_module):
    run = runs_module.Run(dataset="d", protocol="base-to-novel", method="svd", shots=16, seed=1, lr=2e-3)
    assert runs_module.training_recipe(run).num_steps(16, 80) == 50  # the paper's 20 epochs of 80 images, batch 32
    longer = runs_module.Run(**{**run.__dict__, "epochs": 100})
    assert runs_module.training_recipe(longer).num_steps(16, 80) == 250 and longer.key() != run.key()
    few = runs_module.Run(dataset="d", protocol="few-shot", method="lora", shots=4, seed=1, lr=2e-4, epochs=2)
    assert runs_module.training_recipe(few).num_steps(4, 40) == 3  # epochs replace LoRA's 500 x K iterations
    old = {k: v for k, v in run.__dict__.items() if k != "epochs"}  # a record written before runs had epochs
    assert runs_module.run_key(old) == run.key()


def test_builtin_model_base_to_novel_rows_use_the_recipe_picked_on_validation(quality, runs_module):
    from peft_svd import recipes

    schedule = recipes.BUILTIN_BASE_TO_NOVEL_RECIPE
    args = quality.parse_args(["--datasets", "builtin:digits", "--methods", "zero-shot", "svd", "--seeds", "1", "--shots", "4"])
    chosen = {"builtin:digits": {"svd": {"factor": 4.0}}}
    lrs, epochs = quality.recipe_lrs(args, chosen), quality.recipe_epochs(args)
    runs, priority = quality.protocol_runs(args, lrs, epochs)
    b2n = {(r.lr, r.epochs): priority[r.key()] for r in runs if r.protocol == "base-to-novel" and r.method == "svd"}
    # the tuned row (priority 1): the recipe's schedule; the paper row: 4e-4 for its own 20 epochs, after it
    assert b2n == {(schedule["lr"], schedule["epochs"]): 1, (runs_module.SVD_BASE_TO_NOVEL["lr"], None): 2}
    few = {r.lr for r in runs if r.protocol == "few-shot" and r.method == "svd"}
    assert few == {runs_module.PAPER_LR["svd"], 4 * runs_module.PAPER_LR["svd"]}  # few-shot rows unchanged
    # another model keeps the paper's 20 epochs at its lr x the few-shot factor
    other = quality.parse_args(["--model", "m", "--datasets", "d", "--methods", "svd", "--seeds", "1"])
    assert quality.recipe_epochs(other) == {}
    assert quality.recipe_lrs(other, {"d": {"svd": {"factor": 4.0}}})[("d", "base-to-novel", "svd", "tuned")] == pytest.approx(
        4 * runs_module.SVD_BASE_TO_NOVEL["lr"])
    # the table's tuned row holds the runs of the recipe's schedule, not the 20-epoch runs at that lr
    def b2n_record(ep, hm):
        return {"dataset": "builtin:digits", "protocol": "base-to-novel", "method": "svd", "shots": 16, "seed": 1,
                "lr": schedule["lr"], "epochs": ep, "base": hm, "novel": hm, "hm": hm}

    record = {"settings": {"datasets": [{"source": "builtin:digits"}], "methods": ["svd"], "recipes": ["tuned"], "shots": [4],
                           "seeds": [1]},
              "dataset_names": {"builtin:digits": "digits"}, "recipe_lrs": {"|".join(k): v for k, v in lrs.items()},
              "recipe_epochs": {"|".join(k): v for k, v in epochs.items()},
              "runs": [b2n_record(None, 10.0), b2n_record(schedule["epochs"], 70.0)]}
    assert quality.summarize(record)["base_to_novel"]["digits"]["svd/tuned"]["hm"]["mean"] == 70.0


def test_resume_reuses_runs_keeps_calls_and_refuses_other_settings(quality, runs_module, smoke_run, tiny, monkeypatch):
    out, first = smoke_run

    def no_training(self, run):
        raise AssertionError("a run recorded in results.json was run again")

    monkeypatch.setattr(runs_module.Worker, "execute", no_training)
    with pytest.raises(SystemExit, match="--resume"):
        quality.main(_args(*tiny, out))
    again = quality.main(_args(*tiny, out, "--resume"))
    assert again["runs"] == first["runs"]
    assert [c["command"] for c in again["calls"]][-1].endswith("--resume") and len(again["calls"]) == 2
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(_args(*tiny, out, "--resume", "--lr-factors", "1", "2"))
    # the same model file in another folder (the built-in model of another checkout) is the same model
    moved = os.path.join(os.path.dirname(out), "moved-clip")
    shutil.copytree(tiny[0], moved, dirs_exist_ok=True)
    assert quality.main(_args(moved, *tiny[1:], out, "--resume"))["runs"] == first["runs"]


def test_per_dataset_flags(quality):
    args = quality.parse_args(["--datasets", "a", "b", "--template", "x {}.", "y {}.", "--augment", "glyph",
                               "--base-to-novel", "no", "yes"])
    assert [s.template for s in args.specs] == ["x {}.", "y {}."]
    assert [s.augment for s in args.specs] == ["glyph", "glyph"]
    assert [s.base_to_novel for s in args.specs] == [False, True]
    with pytest.raises(SystemExit):
        quality.parse_args(["--datasets", "a", "b", "--template", "x {}.", "y {}.", "z {}."])  # 3 templates, 2 datasets
    with pytest.raises(SystemExit):
        quality.parse_args(["--datasets", "a", "--template", "no placeholder"])


def test_generic_template_is_warned_about(quality, runs_module, tiny, capsys):
    args = quality.parse_args(["--model", tiny[0], "--datasets", tiny[1], "--retention", "none"])
    worker = runs_module.Worker(tiny[0], args.specs, threads=1)
    quality._describe_datasets(args, worker)
    assert "no template known" in capsys.readouterr().err


def test_summary_targets_and_average(quality):
    def few(d, m, k, s, a, lr=None, **extra):
        return {"dataset": d, "protocol": "few-shot", "method": m, "shots": k, "seed": s, "accuracy": a, "lr": lr, **extra}

    runs = [few(d, "svd", 2, s, a, 1e-3, retention_accuracy={"g": r}) for d, s, a, r in
            [("a", 1, 50.0, 80.0), ("a", 2, 60.0, 82.0), ("a", 3, 70.0, 84.0), ("b", 1, 10.0, 70.0), ("b", 2, 20.0, 72.0), ("b", 3, 90.0, 74.0)]]
    runs += [few(d, "lora", 2, s, 40.0, 2e-3, retention_accuracy={"g": 60.0}) for d in "ab" for s in (1, 2, 3)]
    runs += [few(d, m, 1, s, 20.0 + s, lr) for d in "ab" for s in (1, 2, 3) for m, lr in (("svd", 1e-3), ("lora", 2e-3))]
    runs += [few(d, "zero-shot", 0, 0, 30.0) for d in "ab"]
    record = {
        "settings": {"datasets": [{"source": "a"}, {"source": "b"}], "methods": ["zero-shot", "lora", "svd"], "recipes": ["tuned"],
                     "shots": [1, 2], "seeds": [1, 2, 3], "base_to_novel_shots": 16, "select_shots": 2},
        "dataset_names": {"a": "a", "b": "b"},
        "recipe_lrs": {"a|few-shot|svd|tuned": 1e-3, "b|few-shot|svd|tuned": 1e-3, "a|few-shot|lora|tuned": 2e-3,
                       "b|few-shot|lora|tuned": 2e-3},
        "retention_zero_shot": {"g": 85.0},
        "runs": runs,
    }
    summary = quality.summarize(record)
    a = summary["few_shot"]["a"]["svd/tuned"][2]
    assert (a["mean"], a["std"], a["min"], a["max"], a["n"]) == (60.0, 10.0, 50.0, 70.0, 3)
    average = summary["few_shot"]["average"]["svd/tuned"][2]  # per seed: 30, 40, 80
    assert average["mean"] == pytest.approx(50.0) and (average["min"], average["max"]) == (30.0, 80.0)
    assert summary["retention"]["average"]["svd/tuned"]["g"]["mean"] == pytest.approx(77.0)
    assert summary["few_shot"]["average"]["svd/tuned"][1]["mean"] == pytest.approx(22.0)  # every K is averaged
    targets = {t: ok for t, _, ok in quality.check_targets(summary, record)}
    assert targets == {"peft-svd >= LoRA at 1 shot": True, "peft-svd >= LoRA at 2 shots": True, "peft-svd retention on g >= LoRA's": True,
                       "peft-svd retention on g within 5 points of zero-shot": False}
    table = quality.markdown_tables(summary, record)
    assert "| a | peft-svd, tuned lr | 22.0 ± 1.0 | 60.0 ± 10.0 |" in table and "| average | peft-svd, tuned lr | 22.0 ± 1.0 | 50.0 ± 26.5 |" in table
    assert "| peft-svd retention on g within 5 points of zero-shot | 77.0 vs 85.0 | **no** |" in table


# -- the data paths the benchmark uses ---------------------------------------------------------


def test_cached_pixel_evaluation_equals_the_library_evaluation(runs_module, tiny):
    from accelerate import Accelerator

    from peft_svd.fewshot import evaluation

    spec = runs_module.DatasetSpec(tiny[1], template="a photo of a {} thing.")
    worker = runs_module.Worker(tiny[0], [spec], threads=1)
    task = worker.task(tiny[1])
    ours = runs_module.accuracy(worker.base, worker.tokenizer, task, task.test_split)
    library = evaluation.evaluate_protocol(Accelerator(cpu=True), worker.base, worker.tokenizer, worker.image_processor, task.data,
                                           task.test_split, task.template, zero_shot=False)["adapted"]["accuracy"]
    assert ours == pytest.approx(library)
    base, novel = runs_module.fsdata.base_novel_classes(task.data.num_classes)
    ours_novel = runs_module.accuracy(worker.base, worker.tokenizer, task, task.test_split, classes=novel)
    library_novel = evaluation.evaluate_protocol(Accelerator(cpu=True), worker.base, worker.tokenizer, worker.image_processor,
                                                 task.data, task.test_split, task.template, classes="novel",
                                                 zero_shot=False)["adapted"]["accuracy"]
    assert ours_novel == pytest.approx(library_novel)


# -- the baselines -----------------------------------------------------------------------------


def _tiny_model_and_data(tiny):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny[0])
    return model, AutoTokenizer.from_pretrained(tiny[0]), AutoImageProcessor.from_pretrained(tiny[0])


def test_coop_context_replaces_the_placeholders_and_a_step_lowers_the_loss(baselines, tiny):
    from peft_svd.fewshot.zeroshot import encode_text, tokenize_prompts

    model, tokenizer, _ = _tiny_model_and_data(tiny)
    names = ["red", "green", "blue"]
    coop = baselines.CoOpClassifier(model, tokenizer, names, n_ctx=4, generator=torch.Generator().manual_seed(0))
    assert [p.requires_grad for p in coop.parameters()].count(True) == 1 and coop.ctx.shape == (4, model.config.text_config.hidden_size)
    # with the context set to the placeholder's own embedding, the features are the plain prompts'
    embedding = baselines.token_embedding(model)
    with torch.no_grad():
        coop.ctx.copy_(embedding.weight[coop.input_ids[0, 1]].expand(4, -1))
        plain = tokenize_prompts(tokenizer, [f"x x x x {n}." for n in names])
        assert torch.allclose(coop.text_features(), encode_text(model, plain["input_ids"], plain["attention_mask"]), atol=1e-6)
    # a learned context changes them; the frozen encoders get no gradient; SGD steps lower the loss
    pixels, targets = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer, schedule = baselines.coop_optimizer_and_schedule(coop, lr=0.5, num_steps=20, steps_per_epoch=1)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(coop(pixels), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    assert coop(pixels).shape == (6, 3) and losses[-1] < losses[1]
    assert all(p.grad is None for n, p in coop.named_parameters() if n != "ctx")


def test_coop_schedule_warms_up_for_one_epoch_then_follows_a_cosine(baselines, tiny):
    model, tokenizer, _ = _tiny_model_and_data(tiny)
    coop = baselines.CoOpClassifier(model, tokenizer, ["a", "b"], n_ctx=2)
    optimizer, schedule = baselines.coop_optimizer_and_schedule(coop, lr=2e-3, num_steps=12, steps_per_epoch=2)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:2] == [pytest.approx(1e-5)] * 2 and lrs[2] == pytest.approx(2e-3)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] < 2e-4
    assert [baselines.coop_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]


def test_tip_adapter_is_zero_shot_plus_cache_and_fitting_lowers_the_loss(baselines):
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    tip = baselines.TipAdapterF(keys, labels, text, scale=20.0, alpha=0.5, beta=2.0)
    f = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    expected = 20.0 * f @ text.t() + 0.5 * torch.exp(-2.0 * (1 - f @ keys.t())) @ torch.nn.functional.one_hot(labels, 3).float()
    assert torch.allclose(tip.logits(f), expected, atol=1e-6)
    noisy = [torch.nn.functional.normalize(keys + 0.05 * torch.randn(6, 8, generator=g), dim=-1) for _ in range(20)]
    before = torch.nn.functional.cross_entropy(tip.logits(noisy[0]), labels).item()
    tip.fit(noisy, labels, lr=1e-2, eps=1e-4, batch_size=4, generator=g)
    assert torch.nn.functional.cross_entropy(tip.logits(noisy[0]), labels).item() < before
    alpha, beta, accuracy = tip.search(noisy[0], labels)
    assert alpha in baselines.TIP_ALPHA_GRID and beta in baselines.TIP_BETA_GRID and accuracy == 100.0


def test_report_only_runs_nothing_and_counts_seeds(quality, runs_module, smoke_run, tiny, monkeypatch):
    out, first = smoke_run

    def no_run(self, run):
        raise AssertionError("--report-only ran something")

    monkeypatch.setattr(runs_module.Worker, "execute", no_run)
    calls = json.load(open(os.path.join(out, "results.json")))["calls"]
    record = quality.main(_args(*tiny, out, "--report-only", "--seeds", "1", "2"))  # seed 2 never ran
    assert record["runs"] == first["runs"]
    table = open(os.path.join(out, "table.md")).read()
    assert "(n=1)" in table  # cells say they hold one seed of the two asked for
    assert json.load(open(os.path.join(out, "results.json")))["calls"] == calls  # nothing recorded


# -- benchmarks/quality_b2n.py: the base-to-novel schedule -------------------------------------


@pytest.fixture(scope="module")
def b2n_study(quality):
    return _load("quality_b2n_study", "quality_b2n.py")


def test_base_to_novel_schedule_is_picked_on_validation_never_on_test(b2n_study):
    args = b2n_study.parse_args(["--datasets", "a", "b", "--epochs", "20", "100", "--lrs", "1e-3"])
    records = {}
    for d, e, val, test in (("a", 20, 60.0, 90.0), ("b", 20, 60.0, 90.0), ("a", 100, 80.0, 10.0), ("b", 100, 50.0, 10.0)):
        records[b2n_study._run(args, d, e, 1e-3, args.select_seed).key()] = {"val_hm": val, "hm": test}
    scores = b2n_study.validation_scores(args, records)
    assert scores == {(20, 1e-3): 60.0, (100, 1e-3): 65.0}  # the mean over datasets of the validation HM
    assert b2n_study.pick(scores, 1) == [(100, 1e-3)]  # the test split's best (20 epochs) is ignored
    assert b2n_study.pick({(50, 1e-3): 70.0, (20, 2e-3): 70.0, (20, 1e-3): 70.0}, 2) == [(20, 1e-3), (20, 2e-3)]  # shorter first


def test_base_to_novel_study_runs_grid_then_seeds_and_resumes(b2n_study, runs_module, tiny, tmp_path, monkeypatch):
    out = str(tmp_path / "b2n")
    argv = ["--model", tiny[0], "--datasets", tiny[1], "--epochs", "1", "2", "--lrs", "1e-3", "--references", "1:5e-4",
            "--candidates", "1", "--seeds", "1", "2", "--output-dir", out]
    record = b2n_study.main(argv)
    svd = [r for r in record["runs"] if r["method"] == "svd"]
    grid = {(r["epochs"], r["lr"]): r for r in svd if r["seed"] == 1}
    assert set(grid) == {(1, 1e-3), (2, 1e-3), (1, 5e-4)}  # the grid and the reference at the selection seed
    best = max(sorted(((e, lr) for e, lr in grid if lr == 1e-3)), key=lambda s: grid[s]["val_hm"])
    assert [tuple(c) for c in record["selection"]["candidates"]] == [best]
    assert {(r["epochs"], r["lr"]) for r in svd if r["seed"] == 2} == {best, (1, 5e-4)}  # candidate and reference at seed 2
    assert all(r["train_images"] == 3 * 6 and r["steps"] == math.ceil(r["epochs"] * 18 / 32) for r in svd)
    table = open(os.path.join(out, "table.md")).read()
    assert f"| {best[0]:g} epochs, lr 0.001 |" in table and "| 1 epochs, lr 0.0005 |" in table and "| zero-shot |" in table

    def no_training(self, run):
        raise AssertionError("a run recorded in results.json was run again")

    monkeypatch.setattr(runs_module.Worker, "execute", no_training)
    with pytest.raises(SystemExit, match="--resume"):
        b2n_study.main(argv)
    again = b2n_study.main([*argv, "--resume"])
    assert again["runs"] == record["runs"] and len(again["calls"]) == 2
