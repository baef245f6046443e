"""Recipes: the ``sparsity:`` block of an experiment YAML as frozen, validated dataclasses.

Every key is checked: unknown keys, wrong types and impossible patterns are ``ValueError``s naming the key,
the file and the closest valid key, never a stack trace from deep inside torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError
from .masks import check_nm

__all__ = [
    "Rule",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "recipe_from_dict",
    "load_yaml",
    "parse_dataclass",
    "closest",
    "TARGETS",
]

TARGETS = (
    "ff", "q", "k", "v", "qkv", "proj", "linear", "conv", "conv1x1", "conv_kxk", "stem", "head", "first_block",
    "last_layer",
)


class RecipeError(UserError):
    """A recipe or experiment file is invalid; the message says what to change."""


#: names users bring from other trainers (and timm's own long forms) for keys spelled otherwise here
_ALIASES = {"learning_rate": "lr", "optimizer": "opt", "scheduler": "sched", "wd": "weight_decay",
            "num_epochs": "epochs", "bs": "batch_size", "model_name": "model", "dataset_dir": "data_dir"}


def closest(word: str, options: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    options = list(options)
    alias = _ALIASES.get(str(word))
    match = [alias] if alias in options else difflib.get_close_matches(str(word), options, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _where(source: str | None, path: str) -> str:
    return f"'{path}'" + (f" in {source}" if source else "")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists -> tuples, dicts -> dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, path, source)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[X]: X's own message is the clearest
            raise errors[0]
        raise RecipeError(f"{_where(source, path)} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RecipeError(
                f"{_where(source, path)} must be one of {', '.join(map(repr, choices))}, got {value!r}"
                + closest(str(value), [str(c) for c in choices])
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{_where(source, path)} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{_where(source, path)} must be a mapping of keys, got {value!r}")
        return parse_dataclass(tp, value, path, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{_where(source, path)} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{_where(source, path)} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{_where(source, path)} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{_where(source, path)} must be a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{_where(source, path)} must be a mapping, got {value!r}")
        return value
    return value


def parse_dataclass(cls: type, data: dict, path: str = "", source: str | None = None, extra_ok: bool = False):
    """Build the frozen dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    Fields may carry ``metadata={'check': fn}``: ``fn(value)`` returns an error string or None.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            if extra_ok:
                continue
            raise RecipeError(f"unknown key {_where(source, key_path)}{closest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], key_path, source)
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        if check and f.name in kwargs:
            msg = check(kwargs[f.name])
            if msg:
                raise RecipeError(f"{_where(source, f'{path}.{f.name}' if path else f.name)} {msg}")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{_where(source, path or 'sparsity')}: {e}") from None


def _fraction(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v}"


def _positive(v: int) -> str | None:
    return None if v >= 1 else f"must be >= 1, got {v}"


@dataclass(frozen=True)
class Rule:
    """One selection rule. ``target`` names one or more targets (see ``TARGETS``) or ``re:<regex>`` on the fqn.

    N:M methods read ``n``/``m``; block and unstructured methods read ``sparsity``/``tile``. ``skip`` keeps the
    selected layers dense; ``strict`` turns a non-divisible layer into an error instead of a skip.
    """

    target: tuple[str, ...]
    n: int | None = None
    m: int | None = None
    skip: bool = False
    strict: bool = False
    sparse_dim: Literal["row", "col"] | None = None
    sparsity: float | None = None
    tile: int | None = None

    def describe(self) -> str:
        return ",".join(self.target)


def _parse_rule(raw: Any, i: int, source: str | None) -> Rule:
    path = f"sparsity.rules[{i}]"
    if not isinstance(raw, dict):
        raise RecipeError(f"{_where(source, path)} must be a mapping like {{target: ff, n: 2, m: 4}}, got {raw!r}")
    raw = dict(raw)
    if "target" not in raw:
        typo = next((k for k in raw if closest(str(k), ["target"])), None)
        if typo is not None:
            raise RecipeError(f"unknown key {_where(source, f'{path}.{typo}')}; did you mean 'target'?")
        raise RecipeError(f"{_where(source, path)} needs a 'target' (one of {', '.join(TARGETS)} or 're:<regex>')")
    target = raw["target"]
    if isinstance(target, str):
        target = [target]
    if not isinstance(target, list) or not target or not all(isinstance(t, str) for t in target):
        raise RecipeError(f"{_where(source, path + '.target')} must be a target name or a list of them, got {target!r}")
    for t in target:
        if not t.startswith("re:") and t not in TARGETS:
            raise RecipeError(
                f"{_where(source, path + '.target')}: unknown target {t!r} (valid: {', '.join(TARGETS)}, "
                f"or 're:<regex>'){closest(t, TARGETS)}"
            )
        if t.startswith("re:"):
            import re

            try:
                re.compile(t[3:])
            except re.error as e:
                raise RecipeError(f"{_where(source, path + '.target')}: invalid regex {t[3:]!r}: {e}") from None
    raw["target"] = target
    rule = parse_dataclass(Rule, raw, path, source)
    if (rule.n is None) != (rule.m is None):
        raise RecipeError(f"{_where(source, path)} must give both n and m (keep n of every m), or neither")
    if rule.n is not None:
        try:
            check_nm(rule.n, rule.m)
        except ValueError as e:
            raise RecipeError(f"{_where(source, path)}: {e}") from None
    if rule.sparsity is not None and not 0.0 <= rule.sparsity < 1.0:
        raise RecipeError(f"{_where(source, path + '.sparsity')} must be in [0, 1), got {rule.sparsity}")
    if rule.tile is not None and rule.tile < 1:
        raise RecipeError(f"{_where(source, path + '.tile')} must be >= 1, got {rule.tile}")
    return rule


@dataclass(frozen=True)
class Recipe:
    """The validated ``sparsity:`` block. ``options`` holds the method's own frozen config dataclass."""

    method: str = "dense"
    rules: tuple[Rule, ...] = ()
    sparse_dim: Literal["row", "col"] = "row"
    mask_interval: int = field(default=1, metadata={"check": _positive})
    dense_fraction: float = field(default=0.0, metadata={"check": _fraction})
    finetune_fraction: float = field(default=0.0, metadata={"check": _fraction})
    finetune_mask: Literal["frozen", "dynamic"] = "frozen"
    options: Any = None
    source: str | None = None

    def to_dict(self) -> dict:
        """Plain-types dict (YAML/JSON/checkpoint safe) that ``recipe_from_dict`` reads back."""
        out: dict[str, Any] = {"method": self.method}
        out["rules"] = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(r).items()
             if v is not None and not (k in ("skip", "strict") and v is False)}
            for r in self.rules
        ]
        for f in dataclasses.fields(self):
            if f.name in ("method", "rules", "options", "source"):
                continue
            out[f.name] = getattr(self, f.name)
        if self.options is not None:
            out.update(plain(dataclasses.asdict(self.options)))
        return out


def plain(x: Any) -> Any:
    """Plain Python types only, keys as strings and anything else as its ``str`` (YAML, JSON and
    ``weights_only=True`` checkpoints accept the result)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


COMMON_KEYS = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("options", "source")]


def recipe_from_dict(block: dict | None, source: str | None = None) -> Recipe:
    """Validate a ``sparsity:`` mapping into a :class:`Recipe`."""
    from .methods import METHODS, get_method

    if not isinstance(block or {}, dict):
        raise RecipeError(f"{_where(source, 'sparsity')} must be a mapping (method:, rules:, ...), got {block!r}")
    block = dict(block or {})
    method_name = block.get("method", "dense")
    if not isinstance(method_name, str) or method_name not in METHODS:
        raise RecipeError(
            f"{_where(source, 'sparsity.method')}: unknown method {method_name!r} "
            f"(valid: {', '.join(sorted(METHODS))}){closest(str(method_name), METHODS)}"
        )
    method_cls = get_method(method_name)
    option_keys = [f.name for f in dataclasses.fields(method_cls.Config)] if method_cls.Config else []
    common: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in block.items():
        if key in COMMON_KEYS:
            common[key] = value
        elif key in option_keys:
            options[key] = value
        else:
            rule_keys = [f.name for f in dataclasses.fields(Rule) if f.init]
            hint = (f"; '{key}' is a rule key: put it inside each entry of sparsity.rules" if key in rule_keys
                    else closest(str(key), COMMON_KEYS + option_keys))
            raise RecipeError(f"unknown key {_where(source, 'sparsity.' + str(key))} for method '{method_name}'{hint}")
    raw_rules = common.pop("rules", [])
    if not isinstance(raw_rules, list):
        raise RecipeError(f"{_where(source, 'sparsity.rules')} must be a list of rules, got {raw_rules!r}")
    rules = tuple(_parse_rule(r, i, source) for i, r in enumerate(raw_rules))
    recipe = parse_dataclass(Recipe, common, "sparsity", source)
    opts = parse_dataclass(method_cls.Config, options, "sparsity", source) if method_cls.Config else None
    if recipe.dense_fraction + recipe.finetune_fraction >= 1.0:
        raise RecipeError(
            f"{_where(source, 'sparsity')}: dense_fraction + finetune_fraction must be < 1 "
            f"(got {recipe.dense_fraction} + {recipe.finetune_fraction}); leave room for the sparse phase"
        )
    recipe = dataclasses.replace(recipe, method=method_name, rules=rules, options=opts, source=source)
    method_cls.validate(recipe)
    active = [r for r in rules if not r.skip]
    if method_cls.swaps_layers and not active:  # would train dense while named a sparse run
        raise RecipeError(
            f"{_where(source, 'sparsity.rules')}: method '{method_name}' has no rule that selects layers "
            f"({'no rules given' if not rules else 'every rule is skip: true'}), so the model would train dense; add "
            "one, e.g. - {target: ff, n: 2, m: 4}")
    if not method_cls.swaps_layers and active:
        raise RecipeError(
            f"{_where(source, 'sparsity.rules')}: method '{method_name}' trains no sparsity, so its {len(active)} "
            "rule(s) would be ignored; drop them, or choose a sparse method (ste, srste, mdgf, ...)")
    return recipe


def _merge(base: dict, over: dict) -> dict:
    """Recipe inheritance: mappings merge key by key, everything else (lists included) replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last one: a
    recipe saying ``method: ste`` and later ``method: mdgf`` silently trained mdgf)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" merges (explicit keys may override merged ones), complex keys
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where a float needs a dot: ``lr: 1e-3`` was the string '1e-3' and refused as "must be a
# number" (timm's train.py takes it: argparse converts the string). YAML 1.2 reads it as a float, and so does this.
_EXP_FLOAT = ("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
              list("-+.0123456789"))
_UniqueKeyLoader.add_implicit_resolver(*_EXP_FLOAT)


def recipe_differences(saved: dict, now: dict) -> list[str]:
    """The top-level keys in which two recipes (``Recipe.to_dict()`` or a checkpoint's plain copy) differ."""
    saved, now = plain(saved), plain(now)
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump that quotes every string the loader above would read as something else ('1e3')."""


_Dumper.add_implicit_resolver(*_EXP_FLOAT)


def dump_yaml(data: Any, stream=None, **kw) -> Any:
    """``yaml.safe_dump`` whose output :func:`load_yaml` reads back as it was."""
    return yaml.dump(data, stream, Dumper=_Dumper, **kw)


def yaml_value(text: str) -> Any:
    """One YAML scalar or flow value as the recipe files read it (``1e-3`` a float)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_yaml(path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict:
    """Read an experiment YAML, resolving ``base: <relative path>`` inheritance (cycles are errors)."""
    path = Path(path)
    key = str(path.resolve())
    if key in _seen:
        chain = " -> ".join(_seen + (key,))
        raise RecipeError(f"recipe inheritance cycle: {chain}; remove one of the 'base:' keys")
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "does not exist"
        raise RecipeError(f"recipe file {path} {what}" + (f" (named as base: in {_seen[-1]})" if _seen else ""))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping of keys at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"'base' in {path} must be a relative path string, got {base!r}")
    parent = load_yaml(path.parent / base, _seen + (key,))
    return _merge(parent, data)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Load and validate the ``sparsity:`` block of an experiment YAML (or a file holding only that block)."""
    data = load_yaml(path)
    block = data["sparsity"] if "sparsity" in data else data
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise RecipeError(f"'sparsity' in {path} must be a mapping, got {block!r}")
    return recipe_from_dict(block, source=str(path))
