"""mergekit YAML in and out: round trips, the formulas agree, refusals name the reason."""
import pytest
import torch
import yaml

from analysis.merging import merge
from analysis.mergekit import MergekitError, export_yaml, read_yaml, to_mergekit

MODELS = {"a": "/ckpt/task_a", "b": "/ckpt/task_b"}
ROUND_TRIPS = [
    ("weight_averaging", {}),
    ("task_arithmetic", {"alpha": 0.4}),
    ("ties", {"density": 0.3, "alpha": 1.2, "scope": "parameter"}),
    ("dare", {"drop_rate": 0.6, "base": "task_arithmetic", "alpha": 0.5}),
    ("dare", {"drop_rate": 0.6, "base": "ties", "density": 1.0, "alpha": 0.9}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.02, "alpha": 0.7}),
    ("della", {"density": 0.5, "epsilon": 0.1, "alpha": 1.1}),
    ("slerp", {"t": 0.3, "alpha": 1.0}),
    ("model_stock", {"filter_wise": False}),
]


@pytest.mark.parametrize("method,knobs", ROUND_TRIPS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(ROUND_TRIPS)])
def test_export_then_import_gives_the_same_configuration(method, knobs):
    text = export_yaml(method, knobs, "/ckpt/base", MODELS, dtype="bfloat16")
    recipe = read_yaml(text)
    assert recipe.method == method
    assert recipe.base_model == "/ckpt/base" and list(recipe.models.values()) == list(MODELS.values())
    assert recipe.dtype == "bfloat16"
    for k, v in knobs.items():
        assert recipe.knobs[k] == pytest.approx(v) if isinstance(v, float) else recipe.knobs[k] == v
    # and the other way round: a mergekit file read and written again says the same
    again = yaml.safe_load(export_yaml(recipe.method, recipe.knobs, recipe.base_model, recipe.models, recipe.dtype))
    assert again == yaml.safe_load(text)


def test_mergekit_task_arithmetic_weights_and_lambda_become_alpha():
    text = """
merge_method: task_arithmetic
base_model: /m/base
models:
  - model: /m/one
    parameters: {weight: 0.5}
  - model: /m/two
    parameters: {weight: 0.5}
parameters: {lambda: 0.8}
"""
    r = read_yaml(text)
    assert r.method == "task_arithmetic" and r.knobs["alpha"] == pytest.approx(0.4)
    assert list(r.models) == ["one", "two"]
    # normalize true divides by Σ w: α = λ / T whatever the common weight
    r = read_yaml(text.replace("{lambda: 0.8}", "{lambda: 0.8, normalize: true}"))
    assert r.knobs["alpha"] == pytest.approx(0.4)


def test_an_imported_recipe_merges_to_mergekits_formula(tiny_checkpoints):
    paths = tiny_checkpoints
    cfg = {"merge_method": "task_arithmetic", "base_model": str(paths["base"]),
           "models": [{"model": str(p), "parameters": {"weight": 0.7}} for p in paths["tasks"].values()]}
    recipe = read_yaml(yaml.safe_dump(cfg))
    tvs = recipe.load(exclude=[r"^classifier\."])
    merged = merge(tvs, recipe.method, **recipe.knobs)
    for name in tvs.param_names:       # mergekit: θ0 + λ Σ w τ_t with λ = 1
        want = 0.7 * sum(tvs.delta(t, name) for t in tvs.tasks)
        assert torch.allclose(merged[name].cpu(), want, atol=1e-6)


@pytest.mark.parametrize("method,knobs,reason", [
    ("tsv_m", {"rank_fraction": 0.1, "alpha": 1.0}, "no mergekit equivalent"),
    ("karcher", {"max_iter": 10, "tol": 1e-5}, "models' weights"),
    ("ties", {"density": 0.2, "alpha": 1.0, "scope": "model"}, "scope='model'"),
    ("slerp", {"t": 0.5, "alpha": 0.5}, "alpha=0.5"),
])
def test_an_unsupported_export_is_refused_with_the_reason(method, knobs, reason):
    with pytest.raises(MergekitError, match=reason):
        to_mergekit(method, knobs, "/b", MODELS)


@pytest.mark.parametrize("text,reason", [
    ("merge_method: ties\nbase_model: /b\nmodels:\n - model: /x\n   parameters: {weight: 1, density: 0.5}\n"
     " - model: /y\n   parameters: {weight: 1, density: 0.3}\n", r"per-model 'density' differs"),
    ("merge_method: ties\nbase_model: /b\nmodels:\n - model: /x\n   parameters: {weight: 1, density: [0.1, 0.5]}\n",
     "gradient"),
    ("merge_method: slerp\nbase_model: /b\nmodels:\n - model: /x\nparameters: {t: 0.5}\n", "nuslerp"),
    ("merge_method: task_arithmetic\nmodels:\n - model: /x\n", "base_model"),
    ("merge_method: dare_ties\nbase_model: /b\nmodels:\n - model: /x\n   parameters: {weight: 1, density: 0.5}\n",
     "normalize: true"),
    ("merge_method: sce\nbase_model: /b\nmodels:\n - model: /x\n", "no mergescope equivalent"),
])
def test_an_inexpressible_import_is_refused_with_the_reason(text, reason):
    with pytest.raises(MergekitError, match=reason):
        read_yaml(text)
