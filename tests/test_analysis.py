"""Analysis of an adapted tiny CLIP (peft_svd.analysis on a PeftModel) and its written report."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

import peft_svd
from peft_svd.analysis import (
    analyze_adapter,
    attention_head_changes,
    encode_pool,
    joint_space_map,
    parse_layer_name,
    spectral_change,
    summarize,
    write_report,
)
from peft_svd.fewshot.models import adapt

HIDDEN, HEADS, BLOCKS = 32, 4, 3
HEAD_DIM = HIDDEN // HEADS
POOL = [
    "a red car", "a blue boat", "a green tree", "striped fur", "a round ball", "a chest x-ray",
    "a bright sky", "a dark forest", "a small dog", "a yellow flower", "a brick wall", "a wooden table",
]  # fmt: skip


def _tokenizer():
    split = pre_tokenizers.Whitespace()
    words = sorted({w for text in POOL for w, _ in split.pre_tokenize_str(text)})
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3} | {w: i + 4 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def _clip(seed=0):
    torch.manual_seed(seed)
    common = dict(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS
    )
    config = CLIPConfig(
        text_config=dict(
            common,
            vocab_size=4 + 40,
            max_position_embeddings=16,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        ),
        vision_config=dict(common, image_size=16, patch_size=8),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def _orthogonal(n, generator, first=None):
    """A random (n, n) orthogonal matrix, with ``first`` (normalised) as its first column."""
    start = torch.randn(n, n, generator=generator, dtype=torch.float64)
    if first is not None:
        start[:, 0] = first.double()
    q, r = torch.linalg.qr(start)
    return q * torch.sign(torch.diagonal(r))  # keeps the first column's sign


def _set_head_aligned_out_proj(model, block, head, generator):
    """Give the vision block's out_proj singular directions that each read one head; the given
    head owns the largest singular values. Returns the singular values per head."""
    vh = torch.zeros(HIDDEN, HIDDEN, dtype=torch.float64)
    values = torch.empty(HIDDEN, dtype=torch.float64)
    for h in range(HEADS):
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        vh[rows, rows] = _orthogonal(HEAD_DIM, generator)
        low = 5.0 if h == head else 1.0
        values[rows] = torch.linspace(low + 0.9, low, HEAD_DIM, dtype=torch.float64)
    weight = (_orthogonal(HIDDEN, generator) * values) @ vh
    with torch.no_grad():
        model.vision_model.encoder.layers[block].self_attn.out_proj.weight.copy_(weight.float())


def _layer(model, encoder, block, module):
    for name, layer in peft_svd.iter_svd_layers(model):
        if parse_layer_name(name) == (encoder, block, module):
            return layer
    raise KeyError((encoder, block, module))


def test_spectral_change_reports_every_layer_and_the_relative_change():
    model = adapt(_clip(), peft_svd.SVDConfig())
    layer = _layer(model, "text", 1, "fc1")
    with torch.no_grad():
        layer.svd_delta["default"][:3] = torch.tensor([0.5, -0.2, 0.1])
    changes = spectral_change(model)
    assert len(changes) == 2 * BLOCKS * 6
    changed = [c for c in changes if c.relative_change > 0]
    assert [(c.encoder, c.block, c.module) for c in changed] == [("text", 1, "fc1")]
    c = changed[0]
    assert c.name == "text_model.encoder.layers.1.mlp.fc1"
    # ||d|| / ||s0|| is the relative Frobenius change of the weight.
    delta_w = layer.get_delta_weight("default").detach()
    assert c.relative_change == pytest.approx(
        float(delta_w.norm() / layer.get_base_layer().weight.detach().norm()), rel=1e-4
    )
    assert c.top_directions(2, amplified=True) == [0, 2]
    assert c.top_directions(2, amplified=False) == [1]
    groups = summarize(changes, by=("encoder",))
    assert groups[("vision",)]["relative_change"] == 0.0
    assert groups[("text",)]["relative_change"] > 0
    assert groups[("text",)]["values"] == sum(
        x.singular_values.numel() for x in changes if x.encoder == "text"
    )


def test_change_on_one_heads_directions_is_attributed_to_that_head_in_a_model():
    g = torch.Generator().manual_seed(1)
    clip = _clip()
    _set_head_aligned_out_proj(clip, block=1, head=2, generator=g)
    model = adapt(clip, peft_svd.SVDConfig())
    layer = _layer(model, "vision", 1, "out_proj")
    s0 = layer.svd_S
    with torch.no_grad():  # amplify the directions of head 2: the ones with s0 > 4
        layer.svd_delta["default"].copy_(torch.where(s0 > 4, 0.3 * s0, 0.0))
    heads = attention_head_changes(model)
    top = heads[0]
    assert (top.encoder, top.block, top.head) == ("vision", 1, 2)
    assert top.gain > 0 and top.modules["out_proj"] == pytest.approx(0.3, rel=1e-3)
    others = [h for h in heads if (h.encoder, h.block) == ("vision", 1) and h.head != 2]
    assert len(others) == HEADS - 1
    assert max(h.relative_change for h in others) < 1e-3


def test_an_amplified_direction_is_named_by_the_text_it_writes():
    # The top singular direction of the last vision block's out_proj writes exactly the joint-space
    # embedding of one pool text; amplifying it must be reported as amplifying that text.
    tokenizer = _tokenizer()
    clip = _clip()
    pool = encode_pool(clip, tokenizer, POOL)
    joint = joint_space_map(clip.vision_model.post_layernorm, clip.visual_projection)
    target = POOL.index("striped fur")
    u = torch.linalg.pinv(joint) @ pool.embeddings[target]
    g = torch.Generator().manual_seed(2)
    last = clip.vision_model.encoder.layers[BLOCKS - 1].self_attn
    values = torch.linspace(3.0, 0.5, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        last.out_proj.weight.copy_(
            ((_orthogonal(HIDDEN, g, first=u) * values) @ _orthogonal(HIDDEN, g).T).float()
        )
        # An orthogonal value projection keeps the head writes' directions apart.
        last.v_proj.weight.copy_(_orthogonal(HIDDEN, g).float())
    model = adapt(clip, peft_svd.SVDConfig())
    with torch.no_grad():
        _layer(model, "vision", BLOCKS - 1, "out_proj").svd_delta["default"][0] = 1.5

    analysis = analyze_adapter(model, tokenizer, descriptions=POOL, describe_blocks=2)
    named = [
        d for d in analysis.directions if (d["block"], d["module"], d["index"]) == (BLOCKS - 1, "out_proj", 0)
    ]
    assert len(named) == 1 and named[0]["kind"] == "amplified"
    assert named[0]["nearest"][0][0] == "striped fur"
    assert abs(named[0]["nearest"][0][1]) == pytest.approx(1.0, abs=1e-3)
    block = next(e for e in analysis.concepts if (e["block"], e["part"]) == (BLOCKS - 1, "attention"))
    assert block["amplified"][0][0] == "striped fur"
    assert block["relative_energy_change"] > 0
    assert "striped fur" not in [t for t, _ in block["damped"]]
    # Blocks before the described ones get no concept entries; described blocks get one per head.
    assert {e["block"] for e in analysis.concepts} == {BLOCKS - 2, BLOCKS - 1}
    assert sum(e["part"] == "head" for e in analysis.concepts) == 2 * HEADS
    assert any("striped fur" in line for line in analysis.summary_lines())


def test_pool_is_encoded_with_the_pretrained_text_encoder():
    tokenizer = _tokenizer()
    clip = _clip()
    reference = encode_pool(clip, tokenizer, POOL).embeddings
    model = adapt(clip, peft_svd.SVDConfig(init_weights=False))  # a random, non-zero adapter
    torch.testing.assert_close(encode_pool(model, tokenizer, POOL).embeddings, reference)
    # The adapter is active and trainable again afterwards, and does change the text embeddings.
    layer = _layer(model, "text", 0, "q_proj")
    assert not layer.disable_adapters and layer.svd_delta["default"].requires_grad
    with torch.no_grad():
        ids = tokenizer(POOL[:2], padding=True, return_tensors="pt")
        adapted = model.get_text_features(**ids)
        adapted = getattr(adapted, "pooler_output", adapted)
        with model.disable_adapter():
            plain = model.get_text_features(**ids)
            plain = getattr(plain, "pooler_output", plain)
    assert (adapted - plain).abs().max() > 1e-3
    # Texts with an unknown word are dropped, not encoded with the unknown token in its place.
    pool = encode_pool(model, tokenizer, POOL + ["zzz qqq", "a red zzz"])
    assert pool.dropped == ["zzz qqq", "a red zzz"] and len(pool.texts) == len(POOL)


def test_write_report_writes_markdown_json_and_figures(tmp_path):
    g = torch.Generator().manual_seed(3)
    clip = _clip()
    _set_head_aligned_out_proj(clip, block=2, head=1, generator=g)
    model = adapt(clip, peft_svd.SVDConfig())
    layer = _layer(model, "vision", 2, "out_proj")
    with torch.no_grad():
        layer.svd_delta["default"].copy_(torch.where(layer.svd_S > 4, -0.2 * layer.svd_S, 0.0))
        _layer(model, "text", 0, "q_proj").svd_delta["default"][:4] = 0.05
    analysis = analyze_adapter(
        model, _tokenizer(), descriptions=POOL, describe_blocks=1, meta={"base model": "tiny"}
    )
    files = write_report(analysis, tmp_path / "report")
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert names == {
        "report.md",
        "analysis.json",
        "heatmap_vision.png",
        "heatmap_text.png",
        "spectra.png",
        "heads.png",
    }
    for key in ("heatmap_vision", "heatmap_text", "spectra", "heads"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = files["report"].read_text()
    assert "vision block 2 head 1" in report and "![top heads](heads.png)" in report
    data = json.loads(files["json"].read_text())
    assert (data["heads"][0]["block"], data["heads"][0]["head"]) == (2, 1)
    assert data["heads"][0]["gain"] < 0
    assert len(data["layers"]) == 2 * BLOCKS * 6 and data["pool_size"] == len(POOL)
