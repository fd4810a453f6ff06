"""Smoke test of benchmarks/quality.py on a tiny CLIP and a tiny imagefolder (1 shot, 1 seed,
2 steps), and the aggregation that its tables and plot are made of."""

import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "fewshot"))  # tiny_fewshot

from tiny_fewshot import write_imagefolder, write_tiny_clip  # noqa: E402


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location(
        "quality_benchmark", os.path.join(ROOT, "benchmarks", "quality.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    return write_tiny_clip(str(root / "clip")), write_imagefolder(str(root / "colors"))


def _args(model_dir, data_dir, output_dir, *extra):
    return [
        "--model",
        model_dir,
        "--datasets",
        data_dir,
        "--shots",
        "1",
        "--seeds",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-batch-size",
        "16",
        "--threads",
        "1",
        "--output-dir",
        output_dir,
        *extra,
    ]


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
    return sum(
        r * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj")
    )


def test_writes_json_table_and_plot(smoke_run, tiny):
    out, record = smoke_run
    assert sorted(os.listdir(out)) == ["accuracy_vs_shots.png", "results.json", "table.md"]
    with open(os.path.join(out, "accuracy_vs_shots.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(out, "results.json")))
    runs = {(r["protocol"], r["method"]): r for r in saved["runs"]}
    assert set(runs) == {
        ("few-shot", "zero-shot"),
        ("few-shot", "linear-probe"),
        ("few-shot", "lora"),
        ("few-shot", "svd"),
        ("base-to-novel", "zero-shot"),
        ("base-to-novel", "lora"),
        ("base-to-novel", "svd"),
    }
    for (protocol, method), run in runs.items():
        for metric in ("accuracy",) if protocol == "few-shot" else ("base", "novel", "hm"):
            assert 0.0 <= run[metric] <= 100.0, (protocol, method, metric)
        if protocol == "base-to-novel":
            expected = (
                0.0
                if run["base"] + run["novel"] == 0
                else 2 * run["base"] * run["novel"] / (run["base"] + run["novel"])
            )
            assert run["hm"] == pytest.approx(expected)
        if method in ("lora", "svd"):
            assert run["steps"] == 2 and math.isfinite(run["final_loss"])
    # the progress bar's plan is the steps the runs took
    assert saved["planned_training_steps"] == sum(r.get("steps", 0) for r in saved["runs"]) == 8
    # 5 classes x 1 shot; base-to-novel trains on the first 3 classes at 16 shots (6 images each)
    assert (
        runs[("few-shot", "lora")]["train_images"] == 5
        and runs[("few-shot", "linear-probe")]["train_images"] == 5
    )
    assert runs[("base-to-novel", "svd")]["train_images"] == 18
    # LoRA is CLIP-LoRA's: rank 2 on q/k/v of both encoders; its lr and SVD's are the recipes'
    assert runs[("few-shot", "lora")]["trainable_parameters"] == _lora_parameter_count(tiny[0])
    assert runs[("few-shot", "lora")]["lr"] == 2e-4 and runs[("few-shot", "svd")]["lr"] == 5e-4
    assert runs[("base-to-novel", "svd")]["lr"] == 4e-4
    table = open(os.path.join(out, "table.md")).read()
    lp = runs[("few-shot", "linear-probe")]["accuracy"]
    assert f"| colors | linear probe | {lp:.1f} |" in table
    assert "| colors | peft-svd |" in table and "| HM |" in table
    assert record["summary"]["few_shot"]["colors"]["svd"][1]["mean"] == pytest.approx(
        runs[("few-shot", "svd")]["accuracy"]
    )


def test_resume_reuses_runs_and_refuses_other_settings(quality, smoke_run, tiny, monkeypatch):
    out, first = smoke_run

    def no_training(*args, **kwargs):
        raise AssertionError("a run recorded in results.json was trained again")

    monkeypatch.setattr(quality, "_train_and_evaluate", no_training)
    with pytest.raises(SystemExit, match="--resume"):
        quality.main(_args(*tiny, out))
    again = quality.main(_args(*tiny, out, "--resume"))
    assert again["runs"] == first["runs"]
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(_args(*tiny, out, "--resume", "--lora-lr", "1e-3"))


def test_summary_means_spreads_and_average(quality):
    runs = [
        {"dataset": d, "protocol": "few-shot", "method": "svd", "shots": 2, "seed": s, "accuracy": a}
        for d, s, a in [
            ("a", 1, 50.0),
            ("a", 2, 60.0),
            ("a", 3, 70.0),
            ("b", 1, 10.0),
            ("b", 2, 20.0),
            ("b", 3, 90.0),
        ]
    ] + [
        {
            "dataset": "a",
            "protocol": "base-to-novel",
            "method": "lora",
            "shots": 16,
            "seed": 1,
            "base": 80.0,
            "novel": 40.0,
            "hm": 53.3,
        },
    ]
    summary = quality.summarize(runs, ["a", "b"])
    a = summary["few_shot"]["a"]["svd"][2]
    assert (a["mean"], a["std"], a["min"], a["max"], a["n"]) == (60.0, 10.0, 50.0, 70.0, 3)
    average = summary["few_shot"]["average"]["svd"][2]  # per seed: 30, 40, 80
    assert average["mean"] == pytest.approx(50.0) and (average["min"], average["max"]) == (30.0, 80.0)
    assert summary["base_to_novel"]["a"]["lora"]["hm"]["mean"] == 53.3
    assert "lora" not in summary["base_to_novel"].get("average", {})  # dataset b has no base-to-novel run
    table = quality.markdown_tables(summary, [2], ["svd", "lora"])
    assert "| a | peft-svd | 60.0 ± 10.0 |" in table and "| average | peft-svd | 50.0 ± 26.5 |" in table


def test_augmentation_check_scores_every_view(tiny, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "quality_augmentation", os.path.join(ROOT, "benchmarks", "quality_augmentation.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "augmentation.json"
    results = module.main(["--model", tiny[0], "--datasets", tiny[1], "--threads", "1", "--json", str(out)])
    assert set(results["colors"]) == set(module.VIEWS)
    for scores in results["colors"].values():
        assert 0.0 <= scores["accuracy"] <= 100.0 and scores["cross_entropy"] > 0
    # the crop and flip draws are random: an augmented view is not the clean one
    assert results["colors"]["crop 0.08-1"] != results["colors"]["clean (evaluation)"]
    assert json.load(open(out))["results"] == results
