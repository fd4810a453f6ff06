"""The `peft-svd` command (peft_svd.cli)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

import peft_svd
from peft_svd.cli import main
from peft_svd.fewshot.models import adapt

WORDS = ["a", "red", "blue", "car", "boat", "striped", "fur", "dog", "photo", "of", "."]


def _save_base(path):
    """A tiny CLIP and a word-level tokenizer saved like a hub checkpoint."""
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    ).save_pretrained(path)
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            common,
            vocab_size=len(vocab),
            max_position_embeddings=16,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        ),
        vision_config=dict(common, image_size=16, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _save_base(root / "base")
    model = adapt(CLIPModel.from_pretrained(root / "base"), peft_svd.SVDConfig(init_weights=False))
    model.save_pretrained(root / "adapter")
    return root


def test_analyze_writes_the_report_and_figures(adapter, tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("red car\nblue boat\n")
    status = main(
        ["analyze", str(adapter / "adapter"), "--base", str(adapter / "base"), "--out", str(tmp_path / "report"),
         "--classes", str(tmp_path / "classes.txt"), "--blocks", "1"]
    )  # fmt: skip
    assert status == 0
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert files == {
        "report.md",
        "analysis.json",
        "heatmap_vision.png",
        "heatmap_text.png",
        "spectra.png",
        "heads.png",
    }
    report = (tmp_path / "report" / "report.md").read_text()
    for section in (
        "## Summary",
        "## Attention heads",
        "## Concepts written by the later blocks",
        "heads.png",
    ):
        assert section in report
    data = json.loads((tmp_path / "report" / "analysis.json").read_text())
    # The class prompts joined the pool; descriptions with no known word were dropped, not encoded.
    assert "a photo of a red car." in report or "a photo of a red car." in json.dumps(data)
    assert data["pool_size"] >= 2 and len(data["pool_dropped"]) > 0
    assert {e["block"] for e in data["concepts"]} == {1}
    printed = capsys.readouterr().out
    assert printed.startswith("The adapter changed")


def test_analyze_takes_a_recorded_local_base_only_from_the_user(adapter, tmp_path, capsys):
    """A path recorded in adapter_config.json is not loaded on the file's word (a Hub id or the
    built-in model is, see the test below); given with --base, it is, and the line says so."""
    config = json.loads((adapter / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(adapter / "base")
    with pytest.raises(SystemExit, match=r"error: .*path on this machine; pass --base"):
        main(["analyze", str(adapter / "adapter"), "--out", str(tmp_path / "r"), "--default-pool", "none"])
    args = ["analyze", str(adapter / "adapter"), "--base", str(adapter / "base"), "--out", str(tmp_path / "r")]
    assert main([*args, "--default-pool", "none"]) == 0
    assert f"Loading base model {adapter / 'base'} (given on the command line)" in capsys.readouterr().err
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert data["pool_size"] == 0 and data["concepts"] == []  # no descriptions asked for
    assert data["heads"][0]["relative_change"] > 0


def test_analyze_takes_template_and_classes_from_the_runs_results_json(adapter, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter / "adapter", run)
    (run / "results.json").write_text(json.dumps({"template": "a {} boat.", "class_names": ["red", "blue"]}))
    args = ["analyze", str(run), "--base", str(adapter / "base"), "--out", str(tmp_path / "r")]
    assert main([*args, "--default-pool", "none"]) == 0
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert data["pool_size"] == 2
    assert {t for e in data["concepts"] for t, _ in e["writes"]} <= {"a red boat.", "a blue boat."}


def _builtin_available():
    from peft_svd import builtin

    try:
        builtin.model_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _builtin_available(), reason="the built-in CLIP has not been built in this checkout")
def test_analyze_runs_offline_on_the_builtin_model(tmp_path):
    from peft_svd import builtin
    from peft_svd.analysis import default_descriptions

    model = adapt(CLIPModel.from_pretrained(builtin.model_path()), peft_svd.SVDConfig(init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    assert (
        main(["analyze", str(tmp_path / "adapter"), "--base", "builtin", "--out", str(tmp_path / "r")]) == 0
    )
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    # The built-in model gets the pool in its own captions' words, every description usable.
    assert data["pool_size"] == len(default_descriptions("builtin")) and data["pool_dropped"] == []
    assert data["meta"]["description pool"].startswith("builtin")
    assert (tmp_path / "r" / "heads.png").is_file()


def test_analyze_rejects_a_folder_without_an_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and "not an adapter folder" in capsys.readouterr().err


def _run_cli(args):
    """Runs the console script's entry point in a fresh interpreter; returns (exit status, stdout,
    the heavy modules it imported)."""
    code = (
        "import sys, peft_svd_cli\n"
        "try:\n    status = peft_svd_cli.main(sys.argv[1:])\nexcept SystemExit as exc:\n    status = exc.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'peft_svd', 'datasets') if m in sys.modules)\n"
        "print('HEAVY', ','.join(heavy))\nsys.exit(status)\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)
    out, _, heavy = proc.stdout.rpartition("HEAVY ")
    return proc.returncode, out + proc.stderr, heavy.strip()


@pytest.mark.parametrize("args", [["--help"], ["analyze", "--help"], ["--version"], [], ["analyze", "/no/such/adapter"]])
def test_help_version_and_usage_errors_do_not_import_torch(args):
    status, out, heavy = _run_cli(args)
    assert heavy == ""  # answered before torch, transformers, PEFT or peft_svd were imported
    if args == ["--version"]:
        assert status == 0 and out.strip() == f"peft-svd {peft_svd.__version__}"
    elif args == []:  # bare `peft-svd` prints the usage with the commands, not an error
        assert status == 0 and out.startswith("usage: peft-svd") and "analyze" in out
    elif args[-1] == "--help":
        assert status == 0 and "usage: peft-svd" in out
    else:
        assert status == 2 and "not an adapter folder" in out


def test_analyze_loads_an_adapter_of_the_builtin_model_from_any_install_location(tmp_path, monkeypatch):
    """The adapter records `peft-svd/builtin`, not the folder of one installation: saved with the
    built-in model in one place, it is analysed with the model in another (the first one gone)."""
    from peft_svd import builtin
    from peft_svd.fewshot import models as fewshot_models

    shipped = builtin.model_path()
    first, second = tmp_path / "install-1", tmp_path / "install-2"
    shutil.copytree(shipped, first)
    monkeypatch.setattr(builtin, "model_path", lambda: str(first))
    monkeypatch.setattr(builtin, "is_model", lambda name: name == builtin.MODEL_NAME or Path(name) == first)
    encoder = fewshot_models.load_dual_encoder(str(first))  # the folder, as a user may pass it
    assert encoder.name == builtin.MODEL_NAME
    model = adapt(encoder.model, peft_svd.SVDConfig(init_weights=False))
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)  # as examples/fewshot.py
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == builtin.MODEL_NAME

    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(tmp_path / "adapter", moved)
    shutil.rmtree(tmp_path / "adapter")
    shutil.move(first, second)
    monkeypatch.setattr(builtin, "model_path", lambda: str(second))
    assert main(["analyze", str(moved), "--out", str(tmp_path / "r"), "--blocks", "1"]) == 0
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert data["meta"]["base model"] == builtin.MODEL_NAME and data["meta"]["description pool"].startswith("builtin")
    assert data["layers"] and data["pool_size"] > 0
