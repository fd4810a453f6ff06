"""Smoke tests of the benchmark scripts on tiny configurations, so that they cannot rot.

The benchmarks themselves are not run in CI; these tests run each script end to end with tiny
widths and check what it reports (the structure of the results and a few invariants), not speed.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_factorize  # noqa: E402
import bench_train_step  # noqa: E402

TINY = ["--blocks", "1", "--image-size", "32", "--batch", "2", "--prompts", "5"]
TINY += ["--vision-width", "64", "--text-width", "32", "--vocab-size", "500", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_step_benchmark_reports_every_method(tmp_path):
    out = tmp_path / "train.json"
    result = bench_train_step.main(
        TINY + ["--steps", "2", "--warmup", "1", "--no-memory", "--json", str(out)]
    )
    assert json.loads(out.read_text())["config"]["prompts"] == 5
    methods = result["methods"]
    assert set(methods) == set(bench_train_step.TRAIN_METHODS + bench_train_step.EVAL_METHODS)
    for entry in methods.values():
        assert len(entry["times_s"]) == 2 and all(t > 0 for t in entry["times_s"])
    # 1 block per encoder: q, k, v, out_proj (d values each) and fc1, fc2 (d each), d = 64 and 32
    assert methods["svd"]["trainable_params"] == 6 * 64 + 6 * 32
    assert methods["svd"]["trainable_params"] == methods["reference"]["trainable_params"]
    assert methods["lora"]["trainable_params"] == 3 * 2 * 2 * (64 + 32)  # q/k/v, r=2, A and B
    assert methods["svd"]["saved_bytes"] < methods["reference"]["saved_bytes"] / 10
    # the prompts are padded to the longest one (8-16 tokens), the reference's copy to 77
    assert 8 <= result["text_tokens"]["longest"] <= 16
    assert {t["target"] for t in result["targets"]} >= {"training step vs reference rule, same inputs"}
    assert "| peft-svd (defaults) |" in result["table"]


def test_train_step_memory_is_measured_in_a_subprocess(tmp_path):
    argv = bench_train_step._forwarded_argv(bench_train_step.parse_args(TINY + ["--memory-steps", "1"]))
    mem = bench_train_step.memory_in_subprocess("svd", argv, str(tmp_path))
    assert mem["method"] == "svd"
    assert mem["model_bytes"] > 0 and mem["peak_above_model"] > 0
    assert mem["peak_total"] >= mem["peak_above_model"]


def test_synthetic_prompts_look_like_tokenized_class_prompts():
    prompts = bench_train_step.synthetic_prompts(200, 49408, seed=0)
    lengths = [len(p) for p in prompts]
    assert min(lengths) == 8 and max(lengths) <= 16
    assert all(p[0] == 49406 and p[-1] == 49407 for p in prompts)
    batch = bench_train_step.pad_prompts(prompts, None, 49407)
    assert batch["input_ids"].shape == (200, max(lengths))
    assert batch["attention_mask"].sum().item() == sum(lengths)


def test_factorize_benchmark_reports_times_accuracy_and_sizes(tmp_path):
    out = tmp_path / "factorize.json"
    argv = [
        "--blocks",
        "1",
        "--vision-width",
        "64",
        "--text-width",
        "32",
        "--vocab-size",
        "500",
        "--device",
        "cpu",
    ]
    result = bench_factorize.main(argv + ["--json", str(out)])
    assert json.loads(out.read_text())["matrices"] == 12
    assert set(result["timings"]) >= {
        "factorize",
        "cache, cold (decompose + write)",
        "cache, warm (hash + read)",
    }
    assert result["accuracy"]["max_reconstruction_error"] < 1e-6
    assert result["accuracy"]["max_orthonormality_error"] < 1e-5
    # the cache serves the very factors that were computed
    assert (
        result["accuracy_from_cache"]["max_reconstruction_error"]
        == result["accuracy"]["max_reconstruction_error"]
    )
    sizes = result["sizes"]
    assert sizes["peft_svd_trainable_values"] == 6 * 64 + 6 * 32
    assert sizes["peft_svd_adapter_bytes"] < sizes["reference_state_dict_bytes"]
