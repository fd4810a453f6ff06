"""End-to-end checks of examples/fewshot.py and examples/evaluate_adapter.py on a tiny CLIP and a tiny
imagefolder: one process against two (accelerate launch), a run killed mid-way and resumed
against an uninterrupted one, the outputs, publishing, and the errors on bad input.

Tolerance: the singular-value changes of two runs that should agree may differ by float rounding
only; we require max |difference| <= 1e-6 while the changes themselves reach ~1e-3 (lr 5e-4).
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from hub_recorder import HubRecorder
from tiny_fewshot import adapter_deltas as _deltas
from tiny_fewshot import max_difference as _max_difference
from tiny_fewshot import subprocess_env as _env
from tiny_fewshot import write_imagefolder, write_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
SCRIPT = os.path.join(ROOT, "examples", "fewshot.py")
EVALUATE = os.path.join(ROOT, "examples", "evaluate_adapter.py")
TOLERANCE = 1e-6


def _load_example(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluate_example():
    return _load_example(EVALUATE, "evaluate_example")


def _run_args(model_dir, data_dir, output_dir, *extra):
    # 5 classes x 4 shots = 20 images; 3 steps per shot = 12 steps of 8 images.
    return [
        "--model", model_dir, "--dataset", data_dir, "--shots", "4", "--seed", "3", "--iters-per-shot", "3",
        "--batch-size", "8", "--checkpointing-steps", "4", "--output-dir", output_dir, *extra,
    ]


@pytest.fixture(scope="module")
def reference(fewshot, tiny_clip_dir, colors_dir, tmp_path_factory):
    """An uninterrupted one-process run, in this process."""
    from accelerate.state import AcceleratorState, GradientState

    out = str(tmp_path_factory.mktemp("runs") / "reference")
    fewshot.main(_run_args(tiny_clip_dir, colors_dir, out))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


def test_outputs_adapter_results_and_model_card(reference, tiny_clip_dir):
    files = set(os.listdir(reference))
    assert {"adapter_model.safetensors", "adapter_config.json", "results.json", "README.md", "checkpoints"} <= files
    results = json.load(open(os.path.join(reference, "results.json")))
    assert results["shots"] == 4 and results["seed"] == 3 and results["train_images"] == 20
    assert results["training"]["steps"] == 12 and results["training"]["num_processes"] == 1
    assert results["recipe"]["lr"] == 5e-4 and results["recipe"]["weight_decay"] == 0.01
    entry = results["results"][os.path.basename(os.path.normpath(results["dataset"]))]
    assert entry["num_classes"] == 5 and entry["adapted"]["num_examples"] == 20
    assert 0 <= entry["adapted"]["accuracy"] <= 100 and "accuracy" in entry["zero_shot"]
    card = open(os.path.join(reference, "README.md")).read()
    for text in (tiny_clip_dir, results["dataset"], "| shots per class | 4", "| seed | 3", "lr 0.0005", "12 iterations",
                 f"{entry['adapted']['accuracy']:.2f}", "library_name: peft"):
        assert text in card, text
    assert max(v.abs().max().item() for v in _deltas(reference).values()) > 1e-4  # training moved the values
    assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == ["step_4", "step_8"]


def test_saved_adapter_evaluates_to_the_reported_accuracy(reference, evaluate_example, colors_dir, tiny_clip_dir, tmp_path):
    out = tmp_path / "eval.json"
    # the base folder the adapter records is loaded only when the user names it (--model)
    evaluate_example.main(["--adapter", reference, "--model", tiny_clip_dir, "--dataset", colors_dir, "--output", str(out)])
    reported = json.load(open(os.path.join(reference, "results.json")))["results"]
    evaluated = json.load(open(out))["results"]
    assert evaluated == reported


def test_other_datasets_are_scored_with_their_cross_dataset_template(reference, evaluate_example, colors_dir, tiny_clip_dir, tmp_path):
    food = tmp_path / "food101"  # a folder named like the paper's dataset gets that dataset's templates
    shutil.copytree(colors_dir, food)
    out = tmp_path / "eval.json"
    evaluate_example.main(["--adapter", reference, "--model", tiny_clip_dir, "--dataset", str(food), colors_dir,
                           "--output", str(out), "--skip-zero-shot"])
    used = json.load(open(out))["templates"]
    assert used["food101"] == "a photo of {}, a type of food."  # the public code's cross-dataset template
    assert used[os.path.basename(colors_dir)] == "a photo of a {}."


def test_two_processes_give_the_adapter_of_one(reference, tiny_clip_dir, colors_dir, tmp_path):
    """accelerate launch with 2 CPU processes, same global batch and seed (each process takes 4 of
    the 8 images of a step and encodes 3 or 2 of the 5 prompts)."""
    out = str(tmp_path / "two")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT,
    ]
    # Without MPI, `accelerate launch --cpu` starts one process; torchrun plus ACCELERATE_USE_CPU starts two.
    proc = subprocess.run(launch + _run_args(tiny_clip_dir, colors_dir, out), env={**_env(), "ACCELERATE_USE_CPU": "1"},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["training"]["num_processes"] == 2
    assert _max_difference(_deltas(out), _deltas(reference)) <= TOLERANCE
    reference_results = json.load(open(os.path.join(reference, "results.json")))
    assert results["training"]["mean_loss"] == pytest.approx(reference_results["training"]["mean_loss"], abs=1e-5)
    # Evaluation sharded over 2 processes scores every test image once (20 images, batches of 128).
    assert results["results"] == reference_results["results"]


_KILL_AT_STEP = """
import os, runpy, signal, sys
import torch

calls = 0
step = torch.optim.AdamW.step

def step_then_die(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == {kill_at}:  # killed inside step {kill_at}, before its update: no cleanup runs
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)

torch.optim.AdamW.step = step_then_die
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_killed_run_resumes_to_the_adapter_of_an_uninterrupted_one(fewshot, reference, tiny_clip_dir, colors_dir, tmp_path):
    out = str(tmp_path / "killed")
    args = _run_args(tiny_clip_dir, colors_dir, out)
    driver = tmp_path / "kill.py"
    driver.write_text(textwrap.dedent(_KILL_AT_STEP.format(kill_at=7, script=SCRIPT, args=args)))
    proc = subprocess.run([sys.executable, str(driver)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-4000:]
    assert not os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_4"]

    fewshot.main(args + ["--resume-from-checkpoint", "latest"])
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["training"]["resumed_from_step"] == 4 and results["training"]["steps"] == 12
    assert _max_difference(_deltas(out), _deltas(reference)) <= TOLERANCE


def test_gradient_accumulation_gives_the_adapter_of_one_batch(fewshot, reference, tiny_clip_dir, colors_dir, tmp_path):
    out = str(tmp_path / "accumulated")
    fewshot.main(_run_args(tiny_clip_dir, colors_dir, out, "--gradient-accumulation-steps", "2"))
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["training"]["steps"] == 12
    assert _max_difference(_deltas(out), _deltas(reference)) <= TOLERANCE


def test_resume_with_other_settings_is_refused(fewshot, reference, tiny_clip_dir, colors_dir):
    args = _run_args(tiny_clip_dir, colors_dir, reference)
    args[args.index("--seed") + 1] = "4"
    with pytest.raises(SystemExit, match="seed: checkpoint 3, now 4"):
        fewshot.main(args + ["--resume-from-checkpoint", "latest"])


def test_existing_output_directory_is_not_overwritten(fewshot, reference, tiny_clip_dir, colors_dir):
    before = {f: os.path.getmtime(os.path.join(reference, f)) for f in os.listdir(reference)}
    with pytest.raises(SystemExit, match="holds a finished run.*--overwrite-output-dir"):
        fewshot.main(_run_args(tiny_clip_dir, colors_dir, reference))
    assert before == {f: os.path.getmtime(os.path.join(reference, f)) for f in os.listdir(reference)}


def test_base_to_novel_and_cross_dataset(fewshot, tiny_clip_dir, colors_dir, tmp_path):
    other = write_imagefolder(str(tmp_path / "other"), train_per_class=1, test_per_class=3, classes=("red", "white"))
    out = str(tmp_path / "b2n")
    fewshot.main([
        "--model", tiny_clip_dir, "--dataset", colors_dir, "--protocol", "base-to-novel", "--shots", "2",
        "--max-steps", "2", "--batch-size", "4", "--output-dir", out, "--eval-datasets", other,
    ])
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["classes_trained"] == 3 and results["train_images"] == 6
    entry = results["results"][os.path.basename(colors_dir)]
    assert (entry["base"]["num_classes"], entry["novel"]["num_classes"]) == (3, 2)
    for key in ("adapted", "zero_shot"):
        base, novel = entry["base"][key]["accuracy"], entry["novel"][key]["accuracy"]
        expected = 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
        assert entry["harmonic_mean"][key] == pytest.approx(expected)
    assert results["results"]["other"]["num_classes"] == 2
    assert results["results"]["other"]["adapted"]["num_examples"] == 6
    assert "harmonic mean" in open(os.path.join(out, "README.md")).read()


def test_push_to_hub_uploads_adapter_model_card_and_results_in_one_commit(fewshot, tiny_clip_dir, colors_dir, tmp_path,
                                                                           monkeypatch):
    hub = HubRecorder().install(monkeypatch)
    out = str(tmp_path / "pushed")
    fewshot.main(["--model", tiny_clip_dir, "--dataset", colors_dir, "--shots", "1", "--max-steps", "2", "--batch-size", "4",
                  "--skip-zero-shot", "--checkpointing-steps", "1", "--output-dir", out, "--push-to-hub",
                  "--hub-model-id", "someone/clip-svd-colors"])
    assert ("create_repo", "someone/clip-svd-colors") in hub.calls
    [commit] = hub.commits()
    assert commit[1] == "someone/clip-svd-colors"
    files = commit[3]  # the checkpoints/ of the run stay local
    assert set(files) == {"adapter_model.safetensors", "adapter_config.json", "README.md", "results.json"}
    assert os.listdir(os.path.join(out, "checkpoints"))
    assert files["adapter_model.safetensors"] == open(os.path.join(out, "adapter_model.safetensors"), "rb").read()
    assert b"CLIP-SVD adapter" in files["README.md"] and b"| shots per class | 1" in files["README.md"]


def test_push_to_hub_offline_is_refused_before_training(fewshot, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        fewshot.main(["--push-to-hub", "--hub-model-id", "someone/x"])
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_recipe_follows_the_dataset_and_flags_override_it(fewshot):
    clip = ("--model", "openai/clip-vit-base-patch16")  # a real CLIP: the recipes of the paper

    def recipe(name, *flags, augmentation=None, source=None):
        data = types.SimpleNamespace(name=name, source=source or name, augmentation=augmentation)  # what build_recipe reads
        return fewshot.build_recipe(fewshot.parse_args(list(flags)), data)

    natural = recipe("eurosat", *clip)
    assert (natural.lr, natural.weight_decay, natural.epochs, natural.iters_per_shot) == (5e-4, 0.01, None, 200)
    bio = recipe("BTMRI", *clip)
    assert (bio.lr, bio.weight_decay, bio.epochs) == (7e-3, 0.0, 200)
    assert recipe("BTMRI", *clip, "--lr", "1e-3", "--epochs", "100").lr == 1e-3
    assert recipe("BTMRI", *clip, "--lr", "1e-3", "--epochs", "100").epochs == 100
    assert recipe("BTMRI", *clip, "--recipe", "natural").lr == 5e-4
    with pytest.raises(SystemExit, match="no biomedical recipe for dataset 'eurosat'"):
        recipe("eurosat", *clip, "--recipe", "biomedical")
    # the built-in model gets the built-in recipe (lr picked on the built-in tasks' validation splits)
    assert recipe("digits", source="builtin:digits").lr == 2e-3
    assert recipe("digits", "--recipe", "natural", source="builtin:digits").lr == 5e-4
    assert recipe("digits", "--lr", "1e-3", source="builtin:digits").lr == 1e-3


def test_augmentation_fits_the_dataset_and_flags_override_it(fewshot):
    def recipe(*flags, augmentation=None):
        data = types.SimpleNamespace(name="anything", source="anything", augmentation=augmentation)
        r = fewshot.build_recipe(fewshot.parse_args(list(flags)), data)
        return r.augmentation, r.crop_scale, r.flip

    assert recipe() == ("natural", (0.08, 1.0), True)  # photographs: the paper's
    assert recipe(augmentation="glyph") == ("glyph", (0.5, 1.0), False)  # a dataset that says it holds glyphs
    assert recipe("--augment", "none", augmentation="glyph") == ("none", (1.0, 1.0), False)
    assert recipe("--no-flip") == ("custom", (0.08, 1.0), False)
    assert recipe("--augment", "glyph", "--crop-scale", "0.5", "1", "--no-flip") == ("glyph", (0.5, 1.0), False)
    assert recipe("--crop-scale", "0.3", "0.9", augmentation="glyph") == ("custom", (0.3, 0.9), False)
    # every preset of the library is a choice of the script (listed there so that --help imports nothing heavy)
    from peft_svd.fewshot import data as fsdata

    for name in fsdata.AUGMENTATIONS:
        assert recipe("--augment", name)[0] == name


def test_template_without_placeholder_is_refused_before_anything_loads(fewshot, capsys):
    with pytest.raises(SystemExit) as exc:
        fewshot.main(["--template", "a photo of a thing."])
    assert exc.value.code == 2
    assert "must contain exactly one '{}'" in capsys.readouterr().err


def test_unlabelled_dataset_is_refused_before_the_model_loads(fewshot, tiny_clip_dir, tmp_path, monkeypatch):
    import datasets
    from PIL import Image

    from peft_svd.fewshot import models

    path = str(tmp_path / "unlabelled")
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2}, features=datasets.Features({"image": datasets.Image()}))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(path)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset was checked")

    monkeypatch.setattr(models, "load_dual_encoder", must_not_load)
    with pytest.raises(SystemExit, match="no label column"):
        fewshot.main(["--model", tiny_clip_dir, "--dataset", path, "--output-dir", str(tmp_path / "out")])


def test_adapter_of_another_base_model_is_refused_with_the_right_base(reference, evaluate_example, colors_dir, tmp_path):
    other = write_tiny_clip(str(tmp_path / "other-clip"), seed=5)
    with pytest.raises(SystemExit, match=r"cannot be loaded onto base model .*other-clip.*different base model.*trained on"):
        evaluate_example.main(["--adapter", reference, "--model", other, "--dataset", colors_dir])


def test_launched_processes_that_accelerate_does_not_join_are_refused(fewshot, tiny_clip_dir, colors_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun on a CPU machine without ACCELERATE_USE_CPU
    with pytest.raises(SystemExit, match="2 processes were launched but Accelerate runs 1.*ACCELERATE_USE_CPU=1"):
        fewshot.main(_run_args(tiny_clip_dir, colors_dir, str(tmp_path / "x")))


def test_delta_tolerance_is_meaningful(reference):
    # The comparisons above are only informative if a run differs from the untrained adapter by
    # much more than the tolerance.
    deltas = _deltas(reference)
    assert _max_difference(deltas, {k: torch.zeros_like(v) for k, v in deltas.items()}) > 100 * TOLERANCE


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs were checked")


def test_unreadable_test_and_eval_images_are_found_before_the_model_loads(fewshot, tiny_clip_dir, tmp_path, monkeypatch):
    from peft_svd.fewshot import models

    data = write_imagefolder(str(tmp_path / "data"), train_per_class=2, test_per_class=2, classes=("red", "blue"))
    other = write_imagefolder(str(tmp_path / "other"), train_per_class=1, test_per_class=2, classes=("red", "white"))
    for path in (os.path.join(data, "test", "red", "1.png"), os.path.join(other, "test", "white", "0.png")):
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\ntruncated")
    monkeypatch.setattr(models, "load_dual_encoder", _must_not_load)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        fewshot.main(["--model", tiny_clip_dir, "--dataset", data, "--shots", "1", "--output-dir", str(out),
                      "--eval-datasets", other])
    message = str(exc.value.code)
    assert "split 'test' of" in message and "red/1.png" in message and "white/0.png" in message
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gradient-accumulation-steps", "0"], "argument --gradient-accumulation-steps: must be a positive integer, got 0"),
        (["--eval-batch-size", "0"], "argument --eval-batch-size: must be a positive integer, got 0"),
        (["--lr", "nan"], "argument --lr: must be a finite number > 0 or 'auto', got nan"),
        (["--weight-decay", "-5"], "argument --weight-decay: must be a finite number >= 0, got -5"),
        (["--crop-scale", "0", "1"], r"argument --crop-scale: must be a number in \(0, 1\], got 0"),
        (["--crop-scale", "0.9", "0.5"], "--crop-scale MIN MAX needs MIN <= MAX"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 is above --lr 0.0001"),
        (["--seed", "-1"], "argument --seed: must be a non-negative integer"),
        (["--num-workers", "x"], "argument --num-workers: must be a non-negative integer, got 'x'"),
        (["--shots", "0"], "argument --shots: must be a positive integer"),
    ],
)
def test_bad_flags_are_refused_by_name(fewshot, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        fewshot.parse_args(flags)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_batch_that_does_not_split_is_refused_before_the_data_loads(fewshot, monkeypatch):
    from peft_svd.fewshot import data

    monkeypatch.setattr(data, "load_image_classification", _must_not_load)
    with pytest.raises(SystemExit, match="--batch-size 8 must be a multiple of gradient_accumulation_steps x processes = 3 x 1"):
        fewshot.main(["--batch-size", "8", "--gradient-accumulation-steps", "3"])


def test_results_name_the_classes_and_read_back_as_a_summary(reference, colors_dir):
    from peft_svd.fewshot.record import RunSummary

    results = json.load(open(os.path.join(reference, "results.json")))
    assert results["class_names"] == ["blue", "dark yellow", "green", "red", "white"]
    assert results["train_split"] == "train" and results["mixed_precision"] == "no"
    summary = RunSummary.load(reference)
    assert summary.run.class_names == results["class_names"] and summary.training.steps == 12
    assert summary.to_dict() == results


@pytest.mark.parametrize(
    "flags, field",
    [(["--mixed-precision", "bf16"], "mixed_precision"), (["--class-names", "a,b,c,d,e"], "class_names"),
     (["--crop-scale", "0.5", "1"], "recipe")],
)
def test_resume_with_another_result_changing_setting_is_refused(fewshot, reference, tiny_clip_dir, colors_dir, flags, field):
    with pytest.raises(SystemExit, match=f"other settings \\({field}: checkpoint"):
        fewshot.main(_run_args(tiny_clip_dir, colors_dir, reference) + ["--resume-from-checkpoint", "latest", *flags])


def test_refused_output_folder_is_found_before_the_data_loads(fewshot, reference, monkeypatch):
    from peft_svd.fewshot import data

    monkeypatch.setattr(data, "load_image_classification", _must_not_load)
    with pytest.raises(SystemExit, match="holds a finished run") as exc:
        fewshot.main(["--output-dir", reference])
    assert "--resume-from-checkpoint" not in str(exc.value.code)


def test_failed_final_write_leaves_the_previous_run_untouched(fewshot, reference, tiny_clip_dir, colors_dir, tmp_path, monkeypatch):
    """--overwrite-output-dir, then the disk fills while results.json is written: the folder still
    holds the previous run, byte for byte, and nothing of the new one."""
    import errno
    import shutil

    from peft_svd.fewshot import modelcard

    out = str(tmp_path / "previous")
    shutil.copytree(reference, out)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out) if os.path.isfile(os.path.join(out, n))}

    def disk_full(folder, summary):
        open(os.path.join(folder, "results.json"), "w").close()  # the 0-byte file a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modelcard, "write_model_card", disk_full)
    with pytest.raises(SystemExit, match="^error: cannot write the run's files to .*No space left on device"):
        fewshot.main(["--model", tiny_clip_dir, "--dataset", colors_dir, "--shots", "1", "--max-steps", "1", "--batch-size", "5",
                      "--skip-zero-shot", "--output-dir", out, "--overwrite-output-dir"])
    after = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out) if os.path.isfile(os.path.join(out, n))}
    assert after == before
    # No staging folder left behind; the replaced run's checkpoints went when the new run started training.
    assert sorted(os.listdir(out)) == sorted(set(os.listdir(reference)) - {"checkpoints"})


def test_refused_output_folder_ends_accelerate_launch_with_the_message_only(reference, tiny_clip_dir, colors_dir):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT]
    proc = subprocess.run(launch + _run_args(tiny_clip_dir, colors_dir, reference), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert f"error: output directory {reference} holds a finished run" in proc.stderr
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr, proc.stderr[-3000:]
