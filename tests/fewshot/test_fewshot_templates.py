import pytest

from peft_svd.fewshot.templates import (
    DEFAULT_TEMPLATE,
    TEMPLATES,
    build_prompts,
    check_template,
    template_for,
)

NATURAL = ["imagenet", "caltech101", "oxfordpets", "stanfordcars", "flowers102", "food101", "fgvcaircraft",
           "sun397", "dtd", "eurosat", "ucf101"]
BIOMEDICAL = ["busi", "btmri", "covid19", "ctkidney", "chmnist", "kvasir", "retina", "octmnist", "kneexray", "lungcolon"]


def test_every_dataset_of_the_paper_has_a_template():
    for name in NATURAL + BIOMEDICAL:
        assert check_template(TEMPLATES[name]) == TEMPLATES[name]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tanganke/eurosat", "a centered satellite photo of {}."),
        ("EuroSAT_RGB", "a centered satellite photo of {}."),
        ("dtd", "{} texture."),
        ("oxford-iiit-pet", "a photo of a {}, a type of pet."),
        ("nelorth/oxford-flowers", "a photo of a {}, a type of flower."),
        ("FGVC-Aircraft", "a photo of a {}, a type of aircraft."),
        ("food101", "a photo of a {}, a type of food."),
        ("ucf101", "a photo of a person doing {}."),
        ("COVID-19", "a chest xray of {}."),
        ("imagenet-1k", "a photo of a {}."),
        ("/data/my_photos/", DEFAULT_TEMPLATE),
    ],
)
def test_template_lookup_by_dataset_name(name, expected):
    assert template_for(name) == expected


def test_explicit_template_wins():
    assert template_for("dtd", "itap of a {}.") == "itap of a {}."


@pytest.mark.parametrize("bad", ["a photo of a cat.", "a {} of a {}.", "a photo of {0}.", "a {x} photo of {}."])
def test_bad_templates_are_refused_with_advice(bad):
    with pytest.raises(ValueError, match=r"\{\}"):
        check_template(bad)
    with pytest.raises(ValueError):
        template_for("eurosat", bad)


def test_prompts_fill_the_class_name():
    assert build_prompts(["cat", "sea lion"], "a photo of a {}.") == ["a photo of a cat.", "a photo of a sea lion."]
