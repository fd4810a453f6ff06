"""Spectral change of adapted layers (peft_svd.analysis.spectral) on plain tensors."""

import pytest
import torch

from peft_svd.analysis import LayerChange, parse_layer_name, summarize


def _change(s0, s1, encoder="vision", block=0, module="fc1"):
    s0, s1 = torch.tensor(s0), torch.tensor(s1)
    return LayerChange(f"{encoder}.{block}.{module}", encoder, block, module, s0, s1)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("base_model.model.vision_model.encoder.layers.3.self_attn.q_proj", ("vision", 3, "q_proj")),
        ("text_model.encoder.layers.11.mlp.fc2", ("text", 11, "fc2")),
        ("visual.transformer.resblocks.2.mlp.c_fc", ("visual", 2, "c_fc")),
        ("classifier", ("model", None, "classifier")),
    ],
)
def test_parse_layer_name(name, expected):
    assert parse_layer_name(name) == expected


def test_relative_change_gain_and_ranked_directions():
    c = _change([4.0, 2.0, 1.0, 0.5], [4.0, 2.6, 0.2, 0.7])
    # ||d|| / ||s0|| with d = (0, 0.6, -0.8, 0.2)
    assert c.relative_change == pytest.approx((0.36 + 0.64 + 0.04) ** 0.5 / (16 + 4 + 1 + 0.25) ** 0.5)
    assert c.gain == pytest.approx((16 + 6.76 + 0.04 + 0.49) ** 0.5 / 21.25**0.5 - 1)
    # Ranked by the absolute change: 0.6 before 0.2 although 0.2 is +40% and 0.6 is +30%.
    assert c.top_directions(5, amplified=True) == [1, 3]
    assert c.top_directions(5, amplified=False) == [2]
    torch.testing.assert_close(c.relative_values, torch.tensor([0.0, 0.3, -0.8, 0.4]))
    assert c.flipped == 0


def test_flipped_counts_singular_values_that_crossed_zero():
    c = _change([3.0, 1.0, 0.1, 0.0], [3.0, 1.2, -0.05, -0.01])
    assert c.flipped == 1  # 0.1 -> -0.05; a zero singular value going negative is not a reversal
    assert c.to_dict()["flipped"] == 1


def test_summaries_are_the_relative_change_of_the_concatenated_spectra():
    a = _change([2.0, 1.0], [2.0, 1.5], block=0, module="fc1")
    b = _change([2.0, 1.0], [1.0, 1.0], block=0, module="fc2")
    c = _change([1.0, 1.0], [1.0, 1.0], encoder="text", block=0, module="fc1")
    groups = summarize([a, b, c], by=("encoder",))
    assert list(groups) == [("vision",), ("text",)]
    vision = groups[("vision",)]
    assert vision["relative_change"] == pytest.approx((0.25 + 1.0) ** 0.5 / 10**0.5)
    assert vision["layers"] == 2 and vision["values"] == 4 and vision["flipped"] == 0
    assert groups[("text",)]["relative_change"] == 0.0
    by_module = summarize([a, b, c], by=("encoder", "module"))
    assert by_module[("vision", "fc2")]["gain"] == pytest.approx((2 / 5) ** 0.5 - 1)
    assert summarize([a, b, c], by=())[()]["values"] == 6


def test_a_near_zero_singular_value_is_reported_on_the_layers_scale(tmp_path):
    from peft_svd.analysis import AdapterAnalysis, write_report

    # s0 = 0.0003 -> 0.0943: +31333% of itself, +4.7% of the layer's largest singular value.
    c = _change([2.0, 1.0, 0.0003], [2.0, 1.0, 0.0943])
    torch.testing.assert_close(c.relative_to_largest, torch.tensor([0.0, 0.0, 0.047]))
    assert c.to_dict()["top_amplified"][0] | {"relative": None} == {
        "index": 2, "before": pytest.approx(0.0003), "after": pytest.approx(0.0943), "change": pytest.approx(0.094),
        "of_largest": pytest.approx(0.047), "relative": None,
    }  # fmt: skip
    report = write_report(AdapterAnalysis(layers=[c], heads=[]), tmp_path)["report"].read_text()
    assert "#2: 0.0003 → 0.0943 (+4.70% of s_max)" in report
    assert "d_i / s_max" in report and "31333" not in report
