"""benchmarks/paper.py on a tiny data root in the CoOp layout with the built-in model: every
protocol end to end (2 steps per run), resuming, the layout check before any run, and the table's
comparison with the published numbers.

The protocols run in this process (--launcher in-process: about 1 s per run); one test runs the
default launcher, one `accelerate launch` subprocess per run, once (about 15 s).
"""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "fewshot"))  # tiny_benchmark

from tiny_benchmark import write_benchmark_root  # noqa: E402

# The tiny datasets hold fewer images per class than the protocols' 16 shots, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*classes have fewer than:peft_svd.errors.PeftSVDWarning")


@pytest.fixture(scope="module")
def paper():
    spec = importlib.util.spec_from_file_location("paper_benchmark", os.path.join(ROOT, "benchmarks", "paper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_benchmark_root(str(tmp_path_factory.mktemp("paper-data")))


@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """One output folder for the in-process protocol runs: the ImageNet runs are shared."""
    return str(tmp_path_factory.mktemp("paper-runs"))


def _args(data_root, output_dir, protocol, *extra, launcher="in-process"):
    return [protocol, "--data-root", data_root, "--model", "builtin", "--seeds", "1", "--max-steps", "2",
            "--eval-batch-size", "16", "--output-dir", output_dir, "--launcher", launcher, *extra]


def _record(output_dir, protocol):
    folder = os.path.join(output_dir, protocol)
    assert os.path.getsize(os.path.join(folder, "plot.png")) > 1000
    with open(os.path.join(folder, "table.md")) as f:
        table = f.read()
    with open(os.path.join(folder, "results.json")) as f:
        return table, json.load(f)


@pytest.mark.parametrize(
    "protocol, extra, rows, columns",
    [
        ("few-shot", ["--datasets", "eurosat", "fgvc_aircraft", "--shots", "1", "2"], ["eurosat", "fgvc_aircraft"],
         ["zero-shot", "1", "2"]),
        ("base-to-novel", ["--datasets", "dtd"], ["dtd"], ["base", "novel", "hm", "zero-shot hm"]),
        ("cross-dataset", ["--datasets", "caltech101", "ucf101"], ["imagenet", "caltech101", "ucf101"], ["adapted", "zero-shot"]),
        ("domain-generalization", [], ["imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"],
         ["adapted", "zero-shot"]),
        ("biomedical", ["--datasets", "covid", "--shots", "1"], ["covid"], ["zero-shot", "1"]),
        ("biomedical-base-to-novel", ["--datasets", "btmri"], ["btmri"], ["base", "novel", "hm"]),
    ],
)
def test_every_protocol_runs_and_writes_its_table(paper, data_root, shared_output, protocol, extra, rows, columns):
    paper.main(_args(data_root, shared_output, protocol, *extra))
    table, record = _record(shared_output, protocol)
    assert sorted(record["rows"]) == sorted(rows) and not record["missing"]
    for dataset in rows:
        for column in columns:
            assert 0 <= record["rows"][dataset][column]["mean"] <= 100
    assert "CLIP-SVD (paper)" in table and "arXiv:2509.03740" in table
    if protocol == "domain-generalization":
        # ImageNet-A has 3 of the 6 tiny ImageNet classes: its adapter is scored with a 3-way head.
        with open(os.path.join(shared_output, "transfer", "imagenet_a", "imagenet-few-shot-16shot-seed1.json")) as f:
            assert json.load(f)["results"]["imagenet_a"]["num_classes"] == 3


def test_runs_share_the_imagenet_adapter_and_finished_runs_are_skipped(paper, data_root, shared_output, capsys):
    # cross-dataset and domain-generalization above both used this one run.
    runs = os.listdir(os.path.join(shared_output, "train", "imagenet"))
    assert runs == ["few-shot-16shot-seed1"]
    logs = sorted(os.listdir(os.path.join(shared_output, "logs")))
    paper.main(_args(data_root, shared_output, "few-shot", "--datasets", "eurosat", "fgvc_aircraft", "--shots", "1", "2"))
    assert "4 training runs (4 finished)" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(shared_output, "logs"))) == logs  # nothing launched
    # A finished run made with other settings is not mixed into the table.
    with pytest.raises(SystemExit, match="--max-steps 2, not .* and 3; use another --output-dir"):
        paper.main(_args(data_root, shared_output, "few-shot", "--datasets", "eurosat", "--shots", "1", "--max-steps", "3"))


def test_interrupted_run_is_resumed_or_restarted(paper, tmp_path):
    args = paper.parse_args(["few-shot", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    job = paper._train_job(args, paper.PROTOCOLS["few-shot"], "dtd", 4, 2)
    assert "--skip-zero-shot" in job.args  # the base model is evaluated in seed 1's runs only
    assert paper._script_args(job) == job.args  # a fresh run
    os.makedirs(os.path.join(job.output, "checkpoints"))
    with open(os.path.join(job.output, "README.md"), "w") as f:
        f.write("partial")
    assert paper._script_args(job)[-1] == "--overwrite-output-dir"  # killed before a checkpoint
    os.makedirs(os.path.join(job.output, "checkpoints", "step_500"))
    assert paper._script_args(job)[-2:] == ["--resume-from-checkpoint", "latest"]


def test_base_to_novel_uses_the_public_codes_settings(paper, tmp_path):
    args = paper.parse_args(["base-to-novel", "--data-root", str(tmp_path)])
    job = paper._train_job(args, paper.PROTOCOLS["base-to-novel"], "eurosat", 16, 1)
    flags = dict(zip(job.args[::2], job.args[1::2], strict=False))
    assert job.args[job.args.index("--protocol") + 1] == "base-to-novel"
    assert job.args[job.args.index("--lr") + 1] == "0.0004" and job.args[job.args.index("--epochs") + 1] == "20"
    assert job.args[job.args.index("--template") + 1] == "a photo of a {}."
    assert flags["--dataset"] == "coop:eurosat" and args.model == "openai/clip-vit-base-patch16"
    assert paper.parse_args(["biomedical", "--data-root", "x"]).model.endswith("BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")


def test_broken_layout_stops_before_any_run(paper, tmp_path):
    root = write_benchmark_root(str(tmp_path / "data"), keys=["dtd"])
    os.remove(os.path.join(root, "dtd", "split_zhou_DescribableTextures.json"))
    output = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="(?s)split file .*split_zhou_DescribableTextures.json is missing"):
        paper.main(_args(root, output, "few-shot", "--datasets", "dtd", "--shots", "1"))
    assert not os.path.exists(os.path.join(output, "train"))


def test_bad_arguments_are_refused(paper, tmp_path):
    with pytest.raises(SystemExit):
        paper.parse_args(["cross-dataset", "--data-root", "x", "--datasets", "imagenet_a"])  # not a target of that table
    with pytest.raises(SystemExit):
        paper.parse_args(["base-to-novel", "--data-root", "x", "--shots", "4"])
    args = paper.parse_args(["few-shot", "--data-root", "x", "--datasets", "EuroSAT", "--", "--num-workers", "2"])
    assert args.datasets == ["eurosat"] and args.extra == ["--num-workers", "2"]


def test_table_compares_the_average_with_the_published_numbers(paper):
    args = paper.parse_args(["few-shot", "--data-root", "x", "--shots", "1", "16"])
    rows = {d: {1: {"mean": 70.0, "std": 1.0, "n": 3}, 16: {"mean": 80.0, "std": 0.5, "n": 3}} for d in args.datasets}
    table = {"rows": rows, "average": {1: {"mean": 70.0, "n": 11}, 16: {"mean": 80.0, "n": 11}}, "missing": []}
    text = paper.markdown_table(args, paper.PROTOCOLS["few-shot"], table)
    assert "| EuroSAT | 70.00 ± 1.00 | 80.00 ± 0.50 |" in text
    assert "| CLIP-SVD (paper), average | 73.20 | 82.97 |" in text
    assert "| difference (ours - paper) | -3.20 | -2.97 |" in text
    # A subset of the datasets is not compared with the paper's average over all of them.
    args.datasets = ["eurosat"]
    text = paper.markdown_table(args, paper.PROTOCOLS["few-shot"], {**table, "rows": {"eurosat": rows["eurosat"]}})
    assert "| CLIP-SVD (paper), average | - | - |" in text


def test_default_launcher_runs_accelerate_launch(paper, data_root, tmp_path):
    output = str(tmp_path / "out")
    paper.main(_args(data_root, output, "few-shot", "--datasets", "dtd", "--shots", "1", launcher="accelerate"))
    table, record = _record(output, "few-shot")
    assert record["rows"]["dtd"]["1"]["n"] == 1
    with open(os.path.join(output, "logs", "train-dtd_few-shot-1shot-seed1.log")) as f:
        assert "accelerate.commands.launch" in f.readline()
