"""`peft-svd analyze` on adapters of OpenCLIP models: the OpenAI-style `CLIP` (packed q/k/v in
nn.MultiheadAttention) and the BiomedCLIP-style `CustomTextCLIP` (timm trunk with a fused qkv, BERT
text tower), loaded through peft_svd.fewshot.models as training and evaluation load them. The tiny
checkpoints are the fixtures of test_fewshot_openclip.py."""

import json

import pytest
import torch
from test_fewshot_openclip import biomedclip_style_dir, openai_style_dir  # noqa: F401  (fixtures)

import peft_svd
from peft_svd.analysis import spectral_change
from peft_svd.cli import main
from peft_svd.fewshot import models

# blocks and heads per tower of the two checkpoints: (vision blocks, heads), (text blocks, heads)
SHAPES = {"openai_style_dir": ((2, 2), (2, 2)), "biomedclip_style_dir": ((6, 2), (2, 2))}


def _saved_adapter(checkpoint, path):
    model = models.adapt(models.load_dual_encoder(checkpoint).model, peft_svd.SVDConfig(init_weights=False))
    model.save_pretrained(path, save_embedding_layers=False)
    # The run record of examples/fewshot.py gives the class names and the template.
    (path / "results.json").write_text(json.dumps({"template": "a photo of a {}.", "class_names": ["red", "blue", "green"]}))
    return model


@pytest.mark.parametrize("which", ["openai_style_dir", "biomedclip_style_dir"])
def test_analyze_reads_blocks_heads_and_projections_of_openclip_models(which, request, tmp_path):
    checkpoint = request.getfixturevalue(which)
    _saved_adapter(checkpoint, tmp_path / "adapter")
    out = str(tmp_path / "report")
    # a base on this machine that the adapter records is loaded only when the user names it (--base)
    assert main(["analyze", str(tmp_path / "adapter"), "--base", checkpoint, "--out", out,
                 "--blocks", "1", "--default-pool", "none"]) == 0

    data = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert data["meta"]["base model"] == checkpoint  # the base passed, loaded by the same loader
    roles = {(layer["encoder"], layer["module"]) for layer in data["layers"]}
    assert roles == {(e, m) for e in ("vision", "text") for m in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")}
    (vision_blocks, vision_heads), (text_blocks, text_heads) = SHAPES[which]
    assert len(data["layers"]) == 6 * (vision_blocks + text_blocks)
    assert len(data["heads"]) == vision_blocks * vision_heads + text_blocks * text_heads
    assert all(0 < h["relative_change"] for h in data["heads"])
    assert set(data["heads"][0]["modules"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    # The image encoder's last block is described with the class prompts of results.json, encoded by
    # the model's own tokenizer (open_clip's BPE, or the BERT tower's word pieces) and text tower.
    assert data["pool_size"] == 3 and data["pool_dropped"] == []
    assert {(c["encoder"], c["block"]) for c in data["concepts"]} == {("vision", vision_blocks - 1)}
    prompts = {"a photo of a red.", "a photo of a blue.", "a photo of a green."}
    assert {t for c in data["concepts"] for t, _ in c["writes"]} <= prompts
    assert {d["module"] for d in data["directions"]} == {"out_proj", "fc2"}
    assert (tmp_path / "report" / "heads.png").is_file()


def test_packed_qkv_is_reported_per_matrix_with_its_exact_change(request, tmp_path):
    """The q, k and v blocks of a packed in_proj each get their own singular values; the relative
    change reported for each equals ||W' - W||_F / ||W||_F of that block of the weight."""
    model = _saved_adapter(request.getfixturevalue("openai_style_dir"), tmp_path / "adapter")
    changes = {c.name: c for c in spectral_change(model)}
    attention = model.get_base_model().visual.transformer.resblocks[1].attn
    before = attention.get_base_layer().in_proj_weight.detach()
    after = before + attention.in_proj.get_delta_weight("default").detach()  # PEFT's U diag(d) Vh
    width = before.shape[1]
    for i, part in enumerate("qkv"):
        change = changes[f"visual.transformer.resblocks.1.attn.in_proj[{part}]"]
        assert change.module == f"{part}_proj" and change.singular_values.numel() == width
        rows = slice(i * width, (i + 1) * width)
        expected = torch.linalg.norm(after[rows] - before[rows]) / torch.linalg.norm(before[rows])
        assert change.relative_change == pytest.approx(expected.item(), rel=1e-4)
