"""Property test: random mutations of a valid recipe never give a stack trace, only a clear ValueError."""

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsity
from sparsity.recipe import RecipeError

BASE = {
    "method": "mdgf",
    "decay": {"type": "exp", "coef": 1e-4},
    "structure_decay": "sparsify",
    "dense_fraction": 0.1,
    "finetune_fraction": 0.1,
    "rules": [{"target": "ff", "n": 1, "m": 8}, {"target": ["q", "k", "v"], "n": 2, "m": 8},
              {"target": "re:head", "skip": True}],
}
KEYS = ["method", "decay", "type", "coef", "structure_decay", "dense_fraction", "finetune_fraction", "rules",
        "target", "n", "m", "skip", "strict", "sparse_dim", "mask_interval", "srste_lambda", "mdgf_grad",
        "finetune_mask", "tile", "sparsity", "bogus"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["ff", "q", "re:(", "exp", "linear", "srste", "gumbel", "row", "col"]),
    st.lists(st.integers(-2, 9), max_size=3), st.dictionaries(st.sampled_from(KEYS), st.integers(0, 9), max_size=2),
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutations_never_crash(data):
    recipe = copy.deepcopy(BASE)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(recipe) if p]
        path = data.draw(st.sampled_from(paths))
        parent = recipe
        for k in path[:-1]:
            parent = parent[k]
        action = data.draw(st.sampled_from(["set", "delete", "rename", "add"]))
        if action == "set":
            parent[path[-1]] = data.draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "rename" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(KEYS))] = parent.pop(path[-1])
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(KEYS))] = data.draw(VALUES)
    try:
        sparsity.recipe_from_dict(recipe, source="fuzz.yaml")
    except RecipeError as e:
        assert str(e) and "\n" not in str(e)
