"""The few-shot workflow on OpenCLIP models (`peft_svd.fewshot.models`, examples/fewshot.py and
examples/evaluate_adapter.py with `--model hf-hub:...` or a local OpenCLIP checkpoint).

Two tiny OpenCLIP checkpoints are built from configs, without weights or network, in open_clip's
Hub layout (`open_clip_config.json` + `open_clip_model.safetensors`) and loaded with open_clip's
own functions:
- an OpenAI-style `CLIP` (causal text transformer) with open_clip's `SimpleTokenizer`, whose BPE
  vocabulary ships inside the open_clip package (so the 49,408-token embedding);
- a BiomedCLIP-style `CustomTextCLIP`: timm's `test_vit` image trunk (fused qkv) and a 2-layer
  BERT text tower with a word-level BERT tokenizer saved in the folder (open_clip's HFTokenizer),
  context 256 as BiomedCLIP's.
`hf-hub:` names are served from these folders by replacing open_clip's two loaders.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_fewshot import COLORS, WORDS, write_imagefolder

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")

from peft import get_peft_model  # noqa: E402

import peft_svd  # noqa: E402
from peft_svd.fewshot import models  # noqa: E402
from peft_svd.fewshot.templates import build_prompts  # noqa: E402
from peft_svd.fewshot.zeroshot import encode_text, tokenize_prompts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HUB_NAME = "hf-hub:someone/tiny-biomedclip"
PROMPTS = build_prompts(["red", "dark yellow", "blue"], "a centered satellite photo of {}.")
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _save_checkpoint(path: str, model_cfg: dict) -> str:
    """Writes open_clip_config.json, builds the model from it with open_clip (seeded random
    weights) and saves them as open_clip_model.safetensors."""
    os.makedirs(path, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
    with open(os.path.join(path, models.OPEN_CLIP_CONFIG), "w") as f:
        json.dump(config, f)
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + path, pretrained_text=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "open_clip_model.safetensors"))
    return path


@pytest.fixture(scope="module")
def openai_style_dir(tmp_path_factory):
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    }
    return _save_checkpoint(str(tmp_path_factory.mktemp("tiny-openclip")), cfg)


@pytest.fixture(scope="module")
def biomedclip_style_dir(tmp_path_factory):
    from transformers import BertConfig, BertTokenizerFast

    path = str(tmp_path_factory.mktemp("tiny-biomedclip"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    # Built from its parts: transformers 5 ignores `vocab_file` here (the tokenizer would know no word).
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    backend = Tokenizer(WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))]
    )
    BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=256, pad_token_id=0, initializer_range=0.3,  # features that differ between prompts
    ).save_pretrained(path)
    cfg = {  # BiomedCLIP's open_clip_config.json, with tiny towers
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
            "image_size": 160,
        },
        "text_cfg": {
            "hf_model_name": path, "hf_tokenizer_name": path, "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256,
        },
    }
    return _save_checkpoint(path, cfg)


@pytest.fixture
def hub(monkeypatch, biomedclip_style_dir):
    """Serves HUB_NAME from the BiomedCLIP-style folder through open_clip's loaders; records the calls."""
    calls = []
    create, tokenizer = open_clip.create_model_from_pretrained, open_clip.get_tokenizer

    def local(name):
        calls.append(name)
        return "local-dir:" + biomedclip_style_dir if name == HUB_NAME else name

    monkeypatch.setattr(open_clip, "create_model_from_pretrained", lambda name, **kw: create(local(name), **kw))
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name, **kw: tokenizer(local(name), **kw))
    return calls


@pytest.fixture(scope="module")
def architecture(openai_style_dir, tmp_path_factory):
    """(name, weights file): the OpenAI-style config registered as an open_clip architecture."""
    config = json.load(open(os.path.join(openai_style_dir, models.OPEN_CLIP_CONFIG)))["model_cfg"]
    path = tmp_path_factory.mktemp("configs") / "TinyCLIP-test.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(str(path))
    return "TinyCLIP-test", os.path.join(openai_style_dir, "open_clip_model.safetensors")


def _perturbed(model):
    model = get_peft_model(model, peft_svd.SVDConfig())
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in peft_svd.iter_svd_layers(model):
            layer.svd_delta["default"].normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("which", ["openai_style_dir", "biomedclip_style_dir"])
def test_prompts_cut_to_the_longest_give_the_features_of_the_full_context(which, request):
    encoder = models.load_dual_encoder(request.getfixturevalue(which))
    context = encoder.tokenizer.model_max_length
    short = tokenize_prompts(encoder.tokenizer, PROMPTS)
    full = encoder.tokenizer.tokenizer(PROMPTS)  # open_clip's own tokenizer: the whole context
    assert full.shape[1] == context and short["input_ids"].shape[1] <= 16 < context
    assert torch.equal(short["input_ids"], full[:, : short["input_ids"].shape[1]])
    assert short["attention_mask"][:, 0].all() and not short["attention_mask"][:, -1].all()  # prompts of several lengths
    model = _perturbed(encoder.model)  # through the adapted layers, with gradients off
    with torch.no_grad():
        cut = encode_text(model, short["input_ids"], short["attention_mask"])
        reference = torch.nn.functional.normalize(model.encode_text(full), dim=-1)  # open_clip's encode_text
    torch.testing.assert_close(cut, reference, atol=1e-6, rtol=0)
    assert not torch.allclose(cut, cut[[1, 2, 0]], atol=1e-3)  # the features are not all the same


def test_local_checkpoint_loads_with_openclip_preprocessing(openai_style_dir, biomedclip_style_dir):
    encoder = models.load_dual_encoder(openai_style_dir)
    assert (encoder.library, encoder.name, encoder.revision) == ("open_clip", openai_style_dir, None)
    assert encoder.model.name_or_path == openai_style_dir
    assert isinstance(encoder.tokenizer.tokenizer, open_clip.SimpleTokenizer)
    processor = encoder.image_processor
    assert processor.crop_size == {"height": 32, "width": 32} and processor.image_mean == pytest.approx(OPENAI_MEAN)
    from PIL import Image

    image = Image.new("RGB", (50, 40), (200, 30, 30))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    expected = (200 / 255 - OPENAI_MEAN[0]) / OPENAI_STD[0]
    assert pixels[0, 0].mean().item() == pytest.approx(expected, abs=0.02)  # OpenCLIP's normalisation

    bio = models.load_dual_encoder(biomedclip_style_dir)
    assert type(bio.tokenizer.tokenizer).__name__ == "HFTokenizer" and bio.tokenizer.model_max_length == 256
    assert bio.image_processor.crop_size == {"height": 160, "width": 160}


def test_default_targets_apply_to_the_loaded_openclip_models(openai_style_dir, biomedclip_style_dir):
    model = get_peft_model(models.load_dual_encoder(openai_style_dir).model, peft_svd.SVDConfig())
    # 2 blocks x (q, k, v, out, fc, proj) per tower; vision width 32, text width 16
    assert model.get_nb_trainable_parameters()[0] == 2 * 6 * 32 + 2 * 6 * 16
    assert model.peft_config["default"].base_model_name_or_path == openai_style_dir
    bio = get_peft_model(models.load_dual_encoder(biomedclip_style_dir).model, peft_svd.SVDConfig())
    vit_layers = len(bio.base_model.model.visual.trunk.blocks)
    text_layers = len(bio.base_model.model.text.transformer.encoder.layer)
    assert bio.get_nb_trainable_parameters()[0] == vit_layers * 6 * 64 + text_layers * 6 * 16  # qkv split in three


def test_hub_names_and_architectures_go_through_openclip(hub, architecture):
    encoder = models.load_dual_encoder(HUB_NAME)
    assert hub == [HUB_NAME, HUB_NAME] and (encoder.library, encoder.name) == ("open_clip", HUB_NAME)
    with pytest.raises(ValueError, match="carries its own weights"):
        models.load_dual_encoder(HUB_NAME, pretrained="openai")
    name, weights = architecture
    encoder = models.load_dual_encoder(name, pretrained=weights)
    assert (encoder.library, encoder.name, encoder.revision) == ("open_clip", name, weights)
    with pytest.raises(ValueError, match="is an OpenCLIP architecture; give its weights with --pretrained"):
        models.load_dual_encoder(name)
    fewshot = _load_script("fewshot")
    with pytest.raises(SystemExit):
        fewshot.parse_args(["--model", HUB_NAME, "--pretrained", "openai"])


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_example", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_scripts(fewshot_args, evaluate_args):
    """Runs examples/fewshot.py then examples/evaluate_adapter.py in this process."""
    from accelerate.state import AcceleratorState, GradientState

    for name, args in (("fewshot", fewshot_args), ("evaluate_adapter", evaluate_args)):
        try:
            _load_script(name).main(args)
        finally:  # each run creates its own Accelerator; accelerate keeps process-wide state
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _train_then_evaluate(tmp_path, model, *, shots, test_per_class, train_flags=(), evaluate_flags=()):
    """Runs examples/fewshot.py (3 classes, `shots` shots, 2 steps of 3 images) on a dataset folder
    named BUSI, then examples/evaluate_adapter.py on the adapter it saved. Returns (output folder,
    results.json, the results evaluate_adapter.py wrote)."""
    # BUSI is a biomedical dataset name: the biomedical recipe (lr 2e-3, weight decay 0) is picked
    data = write_imagefolder(str(tmp_path / "BUSI"), train_per_class=shots, test_per_class=test_per_class,
                             classes=tuple(COLORS)[:3])
    out, evaluated = str(tmp_path / "run"), str(tmp_path / "eval.json")
    _run_scripts(
        ["--model", model, "--dataset", data, "--shots", str(shots), "--max-steps", "2", "--batch-size", "3",
         "--output-dir", out, *train_flags],
        ["--adapter", out, "--dataset", data, "--output", evaluated, *evaluate_flags],
    )
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["model"] == model and results["model_library"] == "open_clip"
    assert results["training"]["steps"] == 2 and results["recipe"]["lr"] == 2e-3 and results["recipe"]["weight_decay"] == 0
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == model
    deltas = [v for k, v in load_file(os.path.join(out, "adapter_model.safetensors")).items() if k.endswith("svd_delta")]
    assert deltas and max(v.abs().max().item() for v in deltas) > 1e-4  # training moved the singular values
    assert results["results"]["BUSI"]["num_classes"] == 3
    assert results["results"]["BUSI"]["adapted"]["num_examples"] == 3 * test_per_class
    assert "open_clip.create_model_from_pretrained" in open(os.path.join(out, "README.md")).read()
    return out, results, json.load(open(evaluated))["results"]


def test_fewshot_script_on_a_local_openclip_checkpoint_and_evaluate_reloads_it(hub, openai_style_dir, tmp_path):
    # a folder recorded in adapter_config.json is loaded only when the user names it (--model)
    out, results, evaluated = _train_then_evaluate(tmp_path, openai_style_dir, shots=2, test_per_class=2,
                                                   evaluate_flags=["--model", openai_style_dir])
    assert "accuracy" in results["results"]["BUSI"]["zero_shot"]
    assert evaluated == results["results"]  # evaluate_adapter.py loaded the same base
    assert all(name.startswith("local-dir:") for name in hub)  # the folder, through open_clip's local-dir: schema


def test_fewshot_script_on_a_hub_biomedclip_and_evaluate_reloads_it(hub, tmp_path):
    out, results, evaluated = _train_then_evaluate(tmp_path, HUB_NAME, shots=1, test_per_class=1, train_flags=["--skip-zero-shot"],
                                                    evaluate_flags=["--skip-zero-shot"])
    assert evaluated == results["results"]
    assert hub == [HUB_NAME] * 4  # model and tokenizer, by fewshot.py then by evaluate_adapter.py
    assert "base_model: someone/tiny-biomedclip" in open(os.path.join(out, "README.md")).read()


def test_fewshot_script_on_an_architecture_with_pretrained_weights(architecture, tmp_path):
    name, weights = architecture
    # a weights file recorded as the adapter's revision is loaded only when the user names it (--pretrained)
    out, results, evaluated = _train_then_evaluate(tmp_path, name, shots=1, test_per_class=1, train_flags=["--pretrained", weights],
                                                   evaluate_flags=["--model", name, "--pretrained", weights])
    assert results["pretrained"] == weights
    assert json.load(open(os.path.join(out, "adapter_config.json")))["revision"] == weights
    assert evaluated == results["results"]  # evaluate_adapter.py loaded the same weights
    card = open(os.path.join(out, "README.md")).read()
    assert f'create_model_from_pretrained("{name}", pretrained="{weights}")' in card and "base_model:" not in card
