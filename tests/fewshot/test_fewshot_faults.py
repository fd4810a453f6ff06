"""examples/fewshot.py under faults and concurrency: a second run into the same output folder,
damaged and planted checkpoints, a replaced run's checkpoints, signals during training and during a
save, a full disk, classes missing from a split, photographs with an EXIF orientation, and the inputs
that must end in one `error: ...` line (a --model folder that does not exist, a broken CoOp layout,
a test-only benchmark set, `make demo` with a bad flag).

Runs are tiny (5 colour classes, 1 shot, 4 steps of 5 images, a checkpoint after every step); an
interrupted run resumed must give the adapter of the uninterrupted one to float rounding (1e-6, the
changes themselves reach ~1e-3).
"""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_benchmark import write_benchmark_root
from tiny_fewshot import adapter_deltas as _deltas
from tiny_fewshot import max_difference as _max_difference
from tiny_fewshot import subprocess_env as _env
from tiny_fewshot import write_imagefolder

from peft_svd.errors import PeftSVDWarning

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
SCRIPT = os.path.join(ROOT, "examples", "fewshot.py")
TOLERANCE = 1e-6


def _args(model_dir, data_dir, output_dir, *extra):
    # 5 classes x 1 shot = 5 images; 4 steps of 5 images, a checkpoint after steps 1, 2 and 3.
    return ["--model", model_dir, "--dataset", data_dir, "--shots", "1", "--seed", "3", "--max-steps", "4",
            "--batch-size", "5", "--checkpointing-steps", "1", "--skip-zero-shot", "--output-dir", str(output_dir), *extra]


def _must_not_run(*args, **kwargs):
    raise AssertionError("reached a stage the refused run must never reach")


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def finished(fewshot, tiny_clip_dir, colors_dir, tmp_path_factory):
    """An uninterrupted run with checkpoints step_1, step_2, step_3."""
    out = str(tmp_path_factory.mktemp("faults") / "finished")
    fewshot.main(_args(tiny_clip_dir, colors_dir, out))
    _reset_accelerate()
    return out


@pytest.fixture
def copy_of_finished(finished, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(finished, out)
    return out


# One run at a time in an output folder.

_HOLD_LOCK = """
import sys, time
from peft_svd.fewshot.output import RunLock
lock = RunLock.acquire(sys.argv[1], command="the first run --seed 1")
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(folder):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, folder], env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_into_a_busy_folder_is_refused_at_once_naming_the_first(fewshot, tiny_clip_dir, colors_dir, tmp_path,
                                                                           monkeypatch, capsys):
    from peft_svd.fewshot import data, output

    out = str(tmp_path / "busy")
    holder = _hold_lock(out)
    try:
        monkeypatch.setattr(data, "load_image_classification", _must_not_run)
        with pytest.raises(SystemExit) as exc:
            fewshot.main(_args(tiny_clip_dir, colors_dir, out))
        message = str(exc.value.code)
        assert f"--output-dir {out} is in use by another run (pid {holder.pid} on " in message
        assert "the first run --seed 1" in message and "Wait for it to end" in message
        # The refused run touched nothing of the first one's.
        assert output.lock_holder(out)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # The lock of a killed run is gone with its process: its leftover file is taken over.
    assert os.path.exists(os.path.join(out, output.LOCK_FILE))
    assert output.lock_holder(out) is None
    with output.RunLock.acquire(out, command="next") as lock:
        assert output.lock_holder(out) is not None and lock.path == os.path.join(out, output.LOCK_FILE)
    assert not os.path.exists(os.path.join(out, output.LOCK_FILE))


def test_lock_is_let_go_and_an_unused_folder_removed_when_a_run_is_refused(fewshot, tiny_clip_dir, tmp_path):
    from peft_svd.fewshot import output

    out = tmp_path / "refused"
    bad = write_imagefolder(str(tmp_path / "bad"), train_per_class=1, test_per_class=1, classes=("red", "blue"))
    with open(os.path.join(bad, "test", "red", "0.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(SystemExit, match="cannot be read"):
        fewshot.main(_args(tiny_clip_dir, bad, out))
    assert not out.exists()  # created for the lock, left empty, removed
    with output.RunLock.acquire(str(out)):
        pass


def test_finished_run_leaves_no_lock_behind(finished):
    from peft_svd.fewshot import output

    assert not os.path.exists(os.path.join(finished, output.LOCK_FILE))
    assert sorted(os.listdir(os.path.join(finished, "checkpoints"))) == ["step_1", "step_2", "step_3"]


# Checkpoints are read whole before resuming.

def _truncate(path, keep=40):
    with open(path, "rb") as f:
        head = f.read(keep)
    with open(path, "wb") as f:
        f.write(head)


def test_latest_skips_a_damaged_checkpoint_with_a_warning_and_resumes_from_the_newest_good_one(
        fewshot, finished, copy_of_finished, tiny_clip_dir, colors_dir):
    damaged = os.path.join(copy_of_finished, "checkpoints", "step_3", "adapter_model_0.safetensors")
    _truncate(damaged)
    with pytest.warns(PeftSVDWarning, match=r"resuming from .*step_2, the newest checkpoint that can be read; skipped: "
                      r"checkpoint file .*step_3.adapter_model_0\.safetensors cannot be read"):
        fewshot.main(_args(tiny_clip_dir, colors_dir, copy_of_finished, "--resume-from-checkpoint", "latest"))
    results = json.load(open(os.path.join(copy_of_finished, "results.json")))
    assert results["training"]["resumed_from_step"] == 2 and results["training"]["steps"] == 4
    assert _max_difference(_deltas(copy_of_finished), _deltas(finished)) <= TOLERANCE


class _Planted:
    """Unpickling this would create a folder: what a planted pickle could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated adapter", r"checkpoint file .*step_2.adapter_model_0\.safetensors cannot be read safely \(SafetensorError"),
        ("truncated run file", r"checkpoint file .*step_2.fewshot_run\.json is damaged \(JSONDecodeError"),
        ("planted pickle", r"checkpoint file .*step_2.optimizer\.bin cannot be read safely \(UnpicklingError"),
        ("missing scheduler", r"checkpoint .*step_2 is incomplete: scheduler\.bin is missing"),
    ],
)
def test_named_bad_checkpoint_stops_before_the_data_with_one_line_naming_the_file(
        fewshot, copy_of_finished, tiny_clip_dir, colors_dir, tmp_path, monkeypatch, damage, message):
    from peft_svd.fewshot import data

    step = os.path.join(copy_of_finished, "checkpoints", "step_2")
    marker = str(tmp_path / "planted-code-ran")
    if damage == "truncated adapter":
        _truncate(os.path.join(step, "adapter_model_0.safetensors"))
    elif damage == "truncated run file":
        _truncate(os.path.join(step, "fewshot_run.json"), keep=30)
    elif damage == "planted pickle":
        with open(os.path.join(step, "optimizer.bin"), "wb") as f:
            pickle.dump(_Planted(marker), f)
    else:
        os.remove(os.path.join(step, "scheduler.bin"))
    monkeypatch.setattr(data, "load_image_classification", _must_not_run)
    with pytest.raises(SystemExit) as exc:
        fewshot.main(_args(tiny_clip_dir, colors_dir, copy_of_finished, "--resume-from-checkpoint", step))
    text = str(exc.value.code)
    assert text.startswith("error: ") and "\n" not in text
    assert re.search(message, text), text
    assert not os.path.exists(marker)


def test_overwrite_drops_the_replaced_runs_checkpoints(fewshot, copy_of_finished, tiny_clip_dir, colors_dir):
    fewshot.main(_args(tiny_clip_dir, colors_dir, copy_of_finished, "--overwrite-output-dir", "--max-steps", "2"))
    checkpoints = os.path.join(copy_of_finished, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["step_1"]  # the replaced run's step_2 and step_3 are gone
    with open(os.path.join(checkpoints, "step_1", "fewshot_run.json")) as f:
        assert json.load(f)["run"]["num_steps"] == 2
    assert json.load(open(os.path.join(copy_of_finished, "results.json")))["training"]["steps"] == 2


# Signals: only complete checkpoints remain, and a resumed run gives the uninterrupted run's adapter.

_INTERRUPT = """
import os, runpy, signal, sys
import torch
import peft_svd.fewshot.training as training

where, at, sig = {where!r}, {at}, signal.{signal}
# a process started in the background inherits SIGINT ignored (and Python then keeps it so): restore
# what a terminal's Ctrl-C meets
signal.signal(signal.SIGINT, signal.default_int_handler)
calls = 0

def count():
    global calls
    calls += 1
    if calls == at:
        os.kill(os.getpid(), sig)

if where == "step":  # inside optimisation step `at`, before its update
    step = torch.optim.AdamW.step
    def step_then_signal(self, *args, **kwargs):
        count()
        return step(self, *args, **kwargs)
    torch.optim.AdamW.step = step_then_signal
else:  # while checkpoint `at` is being written
    save_file = training.save_file
    def save_then_signal(*args, **kwargs):
        save_file(*args, **kwargs)
        count()
    training.save_file = save_then_signal
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("sig, where, left", [("SIGINT", "step", ["step_1", "step_2"]),
                                              ("SIGTERM", "step", ["step_1", "step_2"]),
                                              ("SIGINT", "save", ["step_1"])])
def test_interrupted_run_keeps_only_complete_checkpoints_and_resumes_to_the_same_adapter(
        fewshot, finished, tiny_clip_dir, colors_dir, tmp_path, sig, where, left):
    out = str(tmp_path / "interrupted")
    args = _args(tiny_clip_dir, colors_dir, out)
    driver = tmp_path / "interrupt.py"
    driver.write_text(textwrap.dedent(_INTERRUPT.format(where=where, at=3 if where == "step" else 2, signal=sig,
                                                        script=SCRIPT, args=args)))
    proc = subprocess.run([sys.executable, str(driver)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode in (-getattr(signal, sig), 128 + getattr(signal, sig)), proc.stderr[-4000:]
    assert not os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == left  # no .step_N.partial either
    from peft_svd.fewshot import output

    lock_file = os.path.join(out, output.LOCK_FILE)
    if sig == "SIGTERM":  # no cleanup ran: the lock file of the dead run is left, its lock is not
        dead = json.load(open(lock_file))["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(dead, 0)
        assert output.lock_holder(out) is None
    else:
        assert not os.path.exists(lock_file)

    fewshot.main(args + ["--resume-from-checkpoint", "latest"])
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["training"]["resumed_from_step"] == len(left) and results["training"]["steps"] == 4
    assert _max_difference(_deltas(out), _deltas(finished)) <= TOLERANCE


def test_partial_checkpoint_of_a_killed_save_is_removed_by_the_next_run(fewshot, copy_of_finished, tiny_clip_dir, colors_dir):
    partial = os.path.join(copy_of_finished, "checkpoints", ".step_3.partial")
    os.makedirs(partial)  # what kill -9 during a save leaves
    fewshot.main(_args(tiny_clip_dir, colors_dir, copy_of_finished, "--resume-from-checkpoint", "latest"))
    assert sorted(os.listdir(os.path.join(copy_of_finished, "checkpoints"))) == ["step_1", "step_2", "step_3"]


# A full disk.

def test_run_that_cannot_fit_on_the_disk_is_refused_before_training(fewshot, tiny_clip_dir, colors_dir, tmp_path, monkeypatch):
    import collections

    from peft_svd.fewshot import output, training

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2000, 2000))
    monkeypatch.setattr(training, "train", _must_not_run)
    out = tmp_path / "full"
    with pytest.raises(SystemExit) as exc:
        fewshot.main(_args(tiny_clip_dir, colors_dir, out))
    text = str(exc.value.code)
    assert text.startswith(f"error: --output-dir {out} has 2.0 KiB free and this run writes about ")
    assert "(3 checkpoint(s) and the adapter)" in text and "--checkpointing-steps" in text
    assert not out.exists()


def _disk_full(path):
    return OSError(errno.ENOSPC, "No space left on device", path)


def test_full_disk_during_a_checkpoint_ends_in_one_line_and_leaves_no_partial_folder(
        fewshot, tiny_clip_dir, colors_dir, tmp_path, monkeypatch):
    from peft_svd.fewshot import training

    def save_file(tensors, path, *args, **kwargs):
        open(path, "wb").close()  # the empty file a full disk leaves
        raise _disk_full(path)

    monkeypatch.setattr(training, "save_file", save_file)
    out = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exc:
        fewshot.main(_args(tiny_clip_dir, colors_dir, out))
    text = str(exc.value.code)
    assert text.startswith(f"error: cannot write checkpoint {out / 'checkpoints' / '.step_1.partial'} (")
    assert "adapter_model_0.safetensors: No space left on device" in text and "--resume-from-checkpoint latest" in text
    assert os.listdir(out / "checkpoints") == []


def test_full_disk_during_the_final_save_ends_in_one_line_and_keeps_the_previous_run(
        fewshot, finished, copy_of_finished, tiny_clip_dir, colors_dir, monkeypatch):
    import peft

    before = {n: open(os.path.join(copy_of_finished, n), "rb").read() for n in os.listdir(copy_of_finished)
              if os.path.isfile(os.path.join(copy_of_finished, n))}

    def save_pretrained(self, folder, **kwargs):
        raise _disk_full(os.path.join(folder, "adapter_model.safetensors"))

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", save_pretrained)
    with pytest.raises(SystemExit) as exc:
        fewshot.main(_args(tiny_clip_dir, colors_dir, copy_of_finished, "--resume-from-checkpoint", "latest"))
    text = str(exc.value.code)
    assert text.startswith(f"error: cannot write the run's files to {copy_of_finished} (")
    assert ".incoming/adapter_model.safetensors: No space left on device" in text
    after = {n: open(os.path.join(copy_of_finished, n), "rb").read() for n in os.listdir(copy_of_finished)
             if os.path.isfile(os.path.join(copy_of_finished, n))}
    assert after == before and ".incoming" not in os.listdir(copy_of_finished)


def test_failed_model_card_write_ends_in_one_line(fewshot, copy_of_finished, tiny_clip_dir, colors_dir, monkeypatch):
    from peft_svd.fewshot import modelcard

    def write_model_card(folder, summary):
        raise _disk_full(os.path.join(folder, "README.md"))

    monkeypatch.setattr(modelcard, "write_model_card", write_model_card)
    with pytest.raises(SystemExit, match=r"^error: cannot write the run's files to .*README\.md: No space left on device"):
        fewshot.main(_args(tiny_clip_dir, colors_dir, copy_of_finished, "--resume-from-checkpoint", "latest"))


# Classes missing from a split.

def test_class_only_in_train_or_only_in_test_is_warned_about_and_recorded(fewshot, tiny_clip_dir, tmp_path):
    counts_train = {"red": 2, "green": 2, "blue": 2, "dark_yellow": 2, "white": 0}
    counts_test = {"red": 2, "green": 0, "blue": 2, "dark_yellow": 2, "white": 2}
    data = str(tmp_path / "gaps")
    write_imagefolder(data, train_per_class=counts_train, test_per_class=counts_test)
    out = tmp_path / "out"
    with pytest.warns(PeftSVDWarning) as caught:
        fewshot.main(["--model", tiny_clip_dir, "--dataset", data, "--shots", "1", "--max-steps", "1", "--batch-size", "4",
                      "--skip-zero-shot", "--output-dir", str(out)])
    messages = [str(w.message) for w in caught]
    assert any("1 of the 5 classes trained have no training image and are never trained: 'white'" in m for m in messages)
    assert any("1 of the 5 classes evaluated on split 'test' of " in m and "never tested: 'green'" in m for m in messages)
    results = json.load(open(out / "results.json"))
    assert results["untrained_classes"] == ["white"]
    assert results["results"]["gaps"]["untested_classes"] == ["green"]
    card = open(out / "README.md").read()
    assert "**Never trained:** 1 class(es) had no training image: `white`" in card
    assert "**Never tested on gaps:** 1 class(es) have no test image: `green`" in card


# Photographs with an EXIF orientation.

def test_exif_orientation_is_applied_when_images_are_read(tmp_path):
    import datasets
    from PIL import Image

    from peft_svd.fewshot.data import read_image

    image = Image.new("RGB", (40, 20), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 10, 20))  # a blue band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = str(tmp_path / "camera.jpg")
    image.save(path, exif=exif.tobytes(), quality=95)
    with open(path, "rb") as f:
        stored = f.read()
    features = datasets.Features({"image": datasets.Image(decode=False)})
    by_path = datasets.Dataset.from_dict({"image": [{"path": path, "bytes": None}]}, features=features)
    by_bytes = datasets.Dataset.from_dict({"image": [{"path": None, "bytes": stored}]}, features=features)
    for split in (by_path, by_bytes):
        upright = read_image(split, 0)
        assert upright.size == (20, 40)  # turned as a viewer shows it
        top = upright.getpixel((10, 2))
        assert top[2] > 150 and top[0] < 100  # the left band is now on top
    # The datasets library's own decoder agrees.
    decoded = datasets.Dataset.from_dict({"image": [path]}, features=datasets.Features({"image": datasets.Image()}))[0]["image"]
    assert decoded.size == (20, 40)


# Inputs that end in one line.

def test_model_folder_that_does_not_exist_is_refused_with_the_flags(fewshot, tmp_path, capsys, monkeypatch):
    from peft_svd.fewshot import data

    monkeypatch.setattr(data, "load_image_classification", _must_not_run)
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(SystemExit) as exc:
        fewshot.main(["--model", missing, "--dataset", "builtin:digits"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--model {missing}: no such folder, and not a Hub id" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        fewshot.main(["--model", "ViT-B-16", "--pretrained", str(tmp_path / "weights.bin")])
    assert "no such weights file" in capsys.readouterr().err


def test_broken_coop_layout_and_test_only_set_end_in_one_clear_error(fewshot, tiny_clip_dir, tmp_path):
    root = write_benchmark_root(str(tmp_path / "data"), keys=["eurosat", "imagenet_a"])
    os.remove(os.path.join(root, "eurosat", "split_zhou_EuroSAT.json"))
    with pytest.raises(SystemExit) as exc:
        fewshot.main(["--model", tiny_clip_dir, "--dataset", "coop:eurosat", "--data-root", root,
                      "--output-dir", str(tmp_path / "a")])
    assert str(exc.value.code).startswith(f"error: EuroSAT (coop:eurosat): split file {root}/eurosat/split_zhou_EuroSAT.json is missing")
    with pytest.raises(SystemExit) as exc:
        fewshot.main(["--model", tiny_clip_dir, "--dataset", "coop:imagenet_a", "--data-root", root,
                      "--output-dir", str(tmp_path / "b")])
    text = str(exc.value.code)
    assert text.startswith("error: ImageNet-A (coop:imagenet_a) is a test-only dataset")
    assert "--eval-datasets coop:imagenet_a" in text and "examples/evaluate_adapter.py" in text
    assert "lay it out as" not in text


def test_benchmark_templates_follow_the_protocol(fewshot, tiny_clip_dir, tmp_path, monkeypatch):
    from peft_svd.fewshot import evaluation

    root = write_benchmark_root(str(tmp_path / "data"), keys=["food101", "dtd"])
    used = []
    evaluate = evaluation.evaluate_protocol

    def recording(accelerator, model, tokenizer, processor, data, split, template, **kwargs):
        used.append((data.name, template))
        return evaluate(accelerator, model, tokenizer, processor, data, split, template, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_protocol", recording)
    out = tmp_path / "b2n"
    fewshot.main(["--model", tiny_clip_dir, "--dataset", "coop:food101", "--data-root", root, "--protocol", "base-to-novel",
                  "--shots", "1", "--max-steps", "1", "--batch-size", "2", "--skip-zero-shot", "--output-dir", str(out),
                  "--eval-datasets", "coop:food101", "coop:dtd"])
    assert json.load(open(out / "results.json"))["template"] == "a photo of {}, a type of food."
    assert ("food101", "a photo of {}, a type of food.") in used  # base-to-novel, and food101 as a cross-dataset target
    assert ("dtd", "{} texture.") in used  # dtd as a cross-dataset target keeps its template


def test_make_demo_prints_a_setup_error_once_without_accelerates_traceback(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # A stand-in for the Makefile's virtual environment: this interpreter and its accelerate, marked installed.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    (venv / "bin" / "accelerate").write_text(
        f"#!{sys.executable}\nimport sys\nfrom accelerate.commands.accelerate_cli import main\nsys.exit(main())\n")
    os.chmod(venv / "bin" / "accelerate", 0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml and the interpreter: nothing to install
    proc = subprocess.run(["make", "-s", "-C", ROOT, "demo", f"VENV={venv}", f"DEMO_DIR={tmp_path / 'demo'}",
                           "ARGS=--shots 0"], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("argument --shots: must be a positive integer, got 0") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr, proc.stderr[-3000:]


def test_protocol_templates_of_the_reference_recipe():
    from peft_svd.fewshot import templates

    assert templates.template_for("food101") == "a photo of a {}, a type of food."
    assert templates.template_for("ethz/food101", protocol="base-to-novel") == "a photo of {}, a type of food."
    assert templates.template_for("Food-101", protocol="cross-dataset") == "a photo of {}, a type of food."
    assert templates.template_for("eurosat", protocol="base-to-novel") == "a photo of a {}."
    assert templates.template_for("eurosat", protocol="cross-dataset") == "a centered satellite photo of {}."
    assert templates.template_for("food101", "itap of a {}.", protocol="base-to-novel") == "itap of a {}."
    assert templates.protocol_template("digits", "base-to-novel") is None
    with pytest.raises(ValueError, match="unknown protocol"):
        templates.protocol_template("food101", "few shot")


def test_untouched_tensor_state_is_loaded_by_the_check(tmp_path):
    # verify_checkpoint reads optimizer states the way Accelerate does (weights_only): a real one passes.
    from peft_svd.fewshot import training

    folder = tmp_path / "ck"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(folder / "adapter_model_0.safetensors"))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    torch.save(opt.state_dict(), folder / "optimizer.bin")
    torch.save({"last_epoch": 1}, folder / "scheduler.bin")
    torch.save({"torch_manual_seed": torch.get_rng_state()}, folder / "random_states_0.pkl")
    (folder / "fewshot_run.json").write_text(json.dumps({"step": 7, "run": {}}))
    assert training.verify_checkpoint(str(folder)) == 7
