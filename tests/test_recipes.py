import pytest

from peft_svd.fewshot.templates import template_for
from peft_svd.fewshot.training import FewShotRecipe
from peft_svd.recipes import BIOMEDICAL_RECIPES, biomedical_recipe

# DESIGN.md section 1: per-dataset learning rates of the biomedical runs
DESIGN_LEARNING_RATES = {
    "BTMRI": 7e-3,
    "BUSI": 2e-3,
    "CHMNIST": 7e-3,
    "COVID-19": 5e-4,
    "CTKidney": 1e-3,
    "KneeXray": 8e-3,
    "Kvasir": 5e-3,
    "LungColon": 3e-3,
    "OCTMNIST": 1e-2,
    "RETINA": 7e-3,
}


@pytest.mark.parametrize("name", sorted(DESIGN_LEARNING_RATES))
def test_each_biomedical_dataset_has_the_paper_recipe(name):
    recipe = biomedical_recipe(name)
    assert recipe["lr"] == DESIGN_LEARNING_RATES[name]
    assert recipe["weight_decay"] == 0.0
    assert 100 <= recipe["epochs"] <= 200
    # the template is the registry's, so the recipe and the few-shot workflow cannot disagree
    assert recipe["template"] == template_for(name)
    # the optimisation fields fit the few-shot workflow's recipe, which runs them in epochs
    run = FewShotRecipe(lr=recipe["lr"], weight_decay=recipe["weight_decay"], epochs=recipe["epochs"])
    assert run.num_steps(shots=16, train_images=64) == recipe["epochs"] * 2


def test_templates_covid_is_a_chest_xray_and_the_others_the_generic_one():
    assert biomedical_recipe("COVID-19")["template"] == "a chest xray of {}."
    others = {k: v["template"] for k, v in BIOMEDICAL_RECIPES.items() if k != "covid19"}
    assert len(others) == 9 and set(others.values()) == {"a photo of a {}."}


def test_lookup_by_other_spellings_and_unknown_names():
    assert biomedical_recipe("covid")["lr"] == biomedical_recipe("covid_19")["lr"] == 5e-4
    assert biomedical_recipe("someorg/Kvasir")["lr"] == 5e-3
    assert biomedical_recipe("data/lung_colon/")["lr"] == 3e-3
    assert biomedical_recipe("eurosat") is None
    # a copy: changing it does not change the table
    recipe = biomedical_recipe("busi")
    recipe["lr"] = 1.0
    assert biomedical_recipe("busi")["lr"] == 2e-3


def test_the_builtin_recipe_follows_the_model_not_the_dataset():
    from peft_svd import builtin, recipes

    assert recipes.builtin_recipe(builtin.MODEL_NAME) == {"lr": 2e-3, "weight_decay": 0.01}
    assert recipes.builtin_recipe(builtin.model_path()) == {"lr": 2e-3, "weight_decay": 0.01}  # its folder
    assert recipes.builtin_recipe("openai/clip-vit-base-patch16") is None
    assert recipes.builtin_recipe("builtin:digits") is None  # a dataset name is not a model
