import pytest

import sparsity
from sparsity.recipe import RecipeError


def _write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_recipe_reads_sparsity_block(tmp_path):
    p = _write(tmp_path, """
model: vit_base_patch16_224
epochs: 300
sparsity:
  method: mdgf
  decay: {type: exp, coef: 1.0e-4}
  structure_decay: none
  dense_fraction: 0.0
  finetune_fraction: 0.1
  rules:
    - {target: ff, n: 1, m: 8}
    - {target: [q, k, v], n: 2, m: 8}
    - {target: "re:head|patch_embed.*", skip: true}
""")
    r = sparsity.load_recipe(p)
    assert r.method == "mdgf"
    assert r.options.decay.type == "exp" and r.options.decay.coef == 1e-4
    assert r.finetune_fraction == 0.1
    assert [rule.target for rule in r.rules] == [("ff",), ("q", "k", "v"), ("re:head|patch_embed.*",)]
    assert r.rules[2].skip
    # round trip through plain types
    again = sparsity.recipe_from_dict(r.to_dict())
    assert again.rules == r.rules and again.options == r.options


@pytest.mark.parametrize("block,pattern", [
    ({"methd": "ste"}, r"unknown key 'sparsity.methd'.*did you mean 'method'"),
    ({"method": "srtse"}, r"unknown method 'srtse'.*did you mean 'srste'"),
    ({"method": "ste", "rules": [{"target": "ff", "n": 5, "m": 4}]}, r"rules\[0\].*n must be in 1..m"),
    ({"method": "ste", "rules": [{"target": "ff", "n": 0, "m": 4}]}, r"n must be in 1..m"),
    ({"method": "ste", "rules": [{"target": "ff", "n": 1, "m": 0}]}, r"m must be >= 1"),
    ({"method": "ste", "rules": [{"target": "ff", "n": 1, "m": "4"}]}, r"'sparsity.rules\[0\].m'.*must be an integer"),
    ({"method": "ste", "rules": [{"target": "fff", "n": 1, "m": 4}]}, r"unknown target 'fff'.*did you mean 'ff'"),
    ({"method": "ste", "rules": [{"target": "ff", "n": 1}]}, r"both n and m"),
    ({"method": "ste", "rules": [{"target": "ff"}]}, r"needs n and m"),
    ({"method": "ste", "rules": [{"target": "ff", "n": 1, "m": 4, "skp": True}]}, r"did you mean 'skip'"),
    ({"method": "ste", "rules": [{"targt": "ff", "n": 1, "m": 4}]},
     r"unknown key 'sparsity.rules\[0\].targt' in .*; did you mean 'target'"),
    ({"method": "ste", "rules": [{"n": 1, "m": 4}]}, r"'sparsity.rules\[0\]' in .* needs a 'target' \(one of ff, "),
    ({"method": "ste", "strict": True, "rules": [{"target": "ff", "n": 2, "m": 4}]},
     r"unknown key 'sparsity.strict'.*'strict' is a rule key: put it inside each entry of sparsity.rules"),
    ({"method": "mdgf", "decay": {"type": "expo"}}, r"did you mean 'exp'"),
    ({"method": "mdgf", "decay": {"typ": "exp"}}, r"unknown key 'sparsity.decay.typ'.*did you mean 'type'"),
    ({"method": "ste", "dense_fraction": 0.6, "finetune_fraction": 0.5}, r"must be < 1"),
    ({"method": "ste", "structure_decay": "sparsfy"}, r"structure_decay"),
    ({"method": "ste", "rules": [{"target": "re:(", "n": 1, "m": 4}]}, r"invalid regex"),
])
def test_recipe_errors_name_key_file_and_closest(tmp_path, block, pattern):
    import yaml

    p = _write(tmp_path, yaml.safe_dump({"sparsity": block}))
    with pytest.raises(RecipeError, match=pattern) as info:
        sparsity.load_recipe(p)
    if "unknown key" in pattern:
        assert str(p) in str(info.value)


def test_rule_matching_nothing_is_an_error():
    from tests.conftest import tiny_model

    recipe = sparsity.recipe_from_dict({"method": "ste", "rules": [{"target": "re:nothing.*", "n": 2, "m": 4}]},
                                       source="x.yaml")
    with pytest.raises(RecipeError, match=r"rules\[0\].*x.yaml matches no layer"):
        sparsity.sparsify_(tiny_model("vit"), recipe)


def test_base_inheritance_and_cycles(tmp_path):
    _write(tmp_path, "epochs: 10\nsparsity: {method: ste, rules: [{target: ff, n: 2, m: 4}], mask_interval: 3}\n",
           "base.yaml")
    child = _write(tmp_path, "base: base.yaml\nsparsity: {method: srste}\n", "child.yaml")
    r = sparsity.load_recipe(child)
    assert r.method == "srste" and r.mask_interval == 3 and r.rules[0].n == 2
    _write(tmp_path, "base: b.yaml\n", "a.yaml")
    _write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError, match="cycle"):
        sparsity.load_yaml(tmp_path / "a.yaml")
    _write(tmp_path, "base: missing.yaml\n", "c.yaml")
    with pytest.raises(RecipeError, match="does not exist"):
        sparsity.load_yaml(tmp_path / "c.yaml")


def test_suggestions_know_other_trainers_names_for_our_keys():
    from sparsity.recipe import closest

    assert closest("learning_rate", ["decay_rate", "lr", "epochs"]) == "; did you mean 'lr'?"  # not the look-alike
    assert closest("optimizer", ["opt", "sched"]) == "; did you mean 'opt'?"
    assert closest("methd", ["method", "rules"]) == "; did you mean 'method'?"  # typos still by spelling


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string, which was refused as "must be a number"; timm's train.py takes it
    import train
    from cli_common import parse_with_config

    cfg = tmp_path / "exp.yaml"
    cfg.write_text("lr: 1e-3\nweight_decay: .5E-4\nsparsity:\n  method: srste\n  srste_lambda: 2e-4\n"
                   "  rules: [{target: ff, n: 2, m: 4}]\n")
    args, blocks = parse_with_config(train.build_parser(), ["--config", str(cfg), "--model-kwargs", "drop_rate=1e-1"])
    assert args.lr == 0.001 and args.weight_decay == 5e-5 and args.model_kwargs == {"drop_rate": 0.1}
    assert sparsity.recipe_from_dict(blocks["sparsity"]).options.srste_lambda == 2e-4
    assert sparsity.load_yaml(cfg)["sparsity"]["rules"][0]["target"] == "ff"  # other scalars as before
    # what the project writes (args.yaml, scheme.yaml) reads back the same: strings such as '1e3' are quoted
    from sparsity.recipe import dump_yaml, yaml_value

    doc = {"experiment": "1e3", "lr": 1e-3, "n": "12", "tiny": 1.5e-7}
    assert "experiment: '1e3'" in dump_yaml(doc) and yaml_value(dump_yaml(doc)) == doc
