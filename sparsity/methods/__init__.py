"""Sparsity methods, registered by name. Adding a method means adding a module here; no caller changes.

A method is a :class:`SparsityMethod` subclass with an optional frozen ``Config`` dataclass for its own recipe
keys. ``sparsify_`` calls its class hooks while it swaps layers (``slice_spec``, ``layer_problem``, ``shape_problem``,
``prepare_layer``); the :class:`~sparsity.controller.SparsityController` owns one instance and calls ``step``
once per optimizer step.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..layers import MaskedMixin, SliceSpec, frozen_weight
from ..recipe import Recipe, RecipeError, Rule

__all__ = ["SparsityMethod", "register_method", "get_method", "METHODS", "fill_missing_slice_params", "KernelPlan",
           "slice_param_name"]

METHODS: dict[str, type[SparsityMethod]] = {}


def register_method(*names: str):
    """Class decorator: register a :class:`SparsityMethod` under one or more names."""

    def deco(cls):
        for name in names:
            METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[SparsityMethod]:
    if name not in METHODS:
        raise RecipeError(f"unknown sparsity method {name!r} (valid: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def slice_param_name(base: str, layer: MaskedMixin, spec: SliceSpec) -> str:
    """Name of a learned per-slice parameter (supermask scores, gumbel logits): ``base`` for a whole-layer unit,
    ``base_<label>`` for a row slice (the q/k/v thirds of a fused qkv)."""
    if len(layer.slices) == 1 and spec.start == 0 and spec.stop == layer.weight.shape[0]:
        return base
    return f"{base}_{re.sub(r'[^0-9A-Za-z_]', '_', spec.label)}"


class KernelPlan:
    """A mask step done wholly by prepared native kernel calls, kept so the next steps replay it with no per-layer
    planning while ``key`` (what the method computes: pattern frame, output kind) and the layers' memory
    (:meth:`guard`) are unchanged. ``run(arg)`` repeats the kernel calls (False: a kernel refused, plan again);
    ``copies`` are (out, w) row ranges no pattern covers (dense rows of a forward-weight buffer); ``written(arg)``
    tells the layers their caches are current again."""

    def __init__(self, key: Any, guard: tuple, run: Callable[[Any], bool], copies: list,
                 written: Callable[[Any], None]) -> None:
        self.key, self.guard_at, self.run, self.copies, self.written = key, guard, run, copies, written

    @staticmethod
    def guard(layers, extra: Callable[[MaskedMixin], tuple] = lambda layer: ()) -> tuple:
        """Every layer's :meth:`MaskedMixin.memory_key` (plus ``extra(layer)``: a method's own tensors). The plan
        keeps views of the old tensors alive, so new memory cannot come back at an old address."""
        return tuple((layer.memory_key(), *extra(layer)) for _, layer in layers)

    def replay(self, key: Any, guard: tuple, arg: Any) -> bool:
        """Run the plan for ``arg`` (beta, kept-tile counts) if it still applies; False: plan afresh."""
        if key != self.key or guard != self.guard_at:
            return False
        for out, w in self.copies:
            out.copy_(w)
        if not self.run(arg):
            return False
        self.written(arg)
        return True


def fill_missing_slice_params(module: MaskedMixin, state_dict: dict, prefix: str, names, from_weight) -> list:
    """Load pre-hook helper for learned per-slice parameters (supermask scores, gumbel logits) that a stock dense
    state dict lacks, so that its strict load succeeds. Each missing one becomes ``from_weight(rows, spec)`` of the
    incoming weight's rows when ``from_weight`` is given and that weight has the layer's shape, else a copy of the
    current value. Returns the ``(spec, value)`` pairs it filled in."""
    w = state_dict.get(prefix + "weight")
    use_weight = from_weight is not None and isinstance(w, torch.Tensor) and w.shape == module.weight.shape
    filled = []
    for spec, name in zip(module.slices, names):
        if prefix + name in state_dict:
            continue
        current = getattr(module, name)
        if use_weight:
            value = from_weight(w[spec.start:spec.stop].to(current.device), spec)
        else:
            value = current.detach().clone()
        state_dict[prefix + name] = value = value.to(current.dtype)
        filled.append((spec, value))
    return filled


class SparsityMethod:
    """Base class. Subclasses override what they need; the defaults describe an N:M method."""

    Config: ClassVar[type | None] = None
    #: False for ``dense``: ``sparsify_`` then changes nothing.
    swaps_layers: ClassVar[bool] = True
    #: the rule keys this method needs on non-skip rules: "nm" (n, m) or "any".
    needs: ClassVar[str] = "nm"
    #: the run folder (rank 0 only; None elsewhere): methods may write artifacts there while training.
    output_dir: str | None = None

    def __init__(self, name: str, model: nn.Module, recipe: Recipe, total_steps: int, steps_per_epoch: int) -> None:
        self.name = name
        self.model = model
        self.recipe = recipe
        self.total_steps = max(int(total_steps), 1)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        from ..layers import masked_modules

        self.layers: list[tuple[str, MaskedMixin]] = masked_modules(model)

    # ---- recipe and surgery hooks (class level) -------------------------------------------------------------
    @classmethod
    def validate(cls, recipe: Recipe) -> None:
        """Check the recipe's rules carry what this method needs."""
        if cls.needs != "nm":
            return
        for i, rule in enumerate(recipe.rules):
            if not rule.skip and rule.n is None:
                where = f" in {recipe.source}" if recipe.source else ""
                raise RecipeError(
                    f"sparsity.rules[{i}] (target {rule.describe()}){where} needs n and m for method "
                    f"'{recipe.method}' (e.g. n: 2, m: 4), or skip: true"
                )

    @classmethod
    def checkpoint_note(cls, recipe: Recipe, global_step: int, total_steps: int) -> str | None:
        """How the model a checkpoint saved at ``global_step`` rebuilds (weights and masks alone) differs from the
        forward the run evaluated at that step, or None when it does not."""
        return None

    @classmethod
    def check_run_length(cls, recipe: Recipe, epochs: int) -> None:
        """Refuse a recipe that cannot run in ``epochs`` epochs (checked before anything is built or written)."""

    @classmethod
    def slice_spec(cls, recipe: Recipe, rule: Rule, label: str, start: int, stop: int, module: nn.Module) -> SliceSpec:
        label = label if label != "all" else rule.describe()
        return SliceSpec(label, start, stop, rule.n, rule.m, rule.sparse_dim or recipe.sparse_dim, rule.sparsity,
                         rule.tile)

    @classmethod
    def skip_reason(cls, recipe: Recipe, fqn: str, tags: set[str]) -> str | None:
        """Why the method keeps a layer that a rule selects dense whatever the rules say (None: rules decide).

        ``tags`` are the layer's target tags (``first_block``, ``last_layer``, ``head``, ...); ``sparsify_`` records
        the reason as a skip in the report.
        """
        return None

    @classmethod
    def required_multiple(cls, recipe: Recipe, spec: SliceSpec) -> int:
        """The grouped dimension must be divisible by this (the largest M the method will use)."""
        return spec.m or 1

    @classmethod
    def layer_problem(cls, recipe: Recipe, module: nn.Module, spec: SliceSpec) -> str | None:
        """Why the method's policy leaves this unit dense on purpose (supermask at sparsity 0, gumbel's
        ignore_grouped), or None. ``sparsify_`` then asks :meth:`shape_problem`."""
        return None

    @classmethod
    def shape_problem(cls, recipe: Recipe, module: nn.Module, spec: SliceSpec) -> str | None:
        """Why this unit's shape cannot take its N:M pattern (None if it can, or if the pattern is not N:M)."""
        if spec.n is None:
            return None
        w = module.weight
        mult = cls.required_multiple(recipe, spec)
        if spec.sparse_dim == "col":
            size, what = spec.stop - spec.start, "output rows"
        elif w.dim() == 4:
            size, what = w.shape[1], "input channels per group"
        else:
            size, what = w.shape[1], "input features"
        if size % mult:
            return f"{what} {size} not divisible by M={mult}"
        return None

    @classmethod
    def prepare_layer(cls, recipe: Recipe, layer: MaskedMixin) -> None:
        """Install ``weight_fn`` and any extra parameters/buffers on a freshly swapped layer.

        Contract for every method: ``layer.weight_mask`` always holds the current binary mask (export, reports
        and ``densify_`` read it), and ``weight_fn`` is what the forward uses.
        """

    # ---- training-time hooks --------------------------------------------------------------------------------
    def step(self, global_step: int) -> None:
        """Prepare masks/scalars for forward number ``global_step`` (optimizer steps already taken)."""

    def sync(self, src: MaskedMixin, dst: MaskedMixin) -> None:
        """Copy non-persistent per-layer state from the live model's layer to another copy (e.g. EMA)."""
        dst.weight_mask.copy_(src.weight_mask)

    def finetune_start(self) -> int:
        """First step of the fine-tune phase: ``total_steps`` when the run has none."""
        from ..schedules import phase_at

        r = self.recipe
        return phase_at(0, self.total_steps, r.dense_fraction, r.finetune_fraction).finetune_start

    def finalize(self) -> None:
        """End of training: leave every layer with a fixed binary mask."""

    def metrics(self) -> dict[str, Any]:
        """Scalars for summary.csv (e.g. beta, current pattern)."""
        return {}

    def metric_reference(self) -> dict[str, torch.Tensor] | None:
        """What the next :meth:`metrics` call compares against (the weights or patterns of the previous call), or
        None. A mid-epoch checkpoint saves it so that a resumed epoch's CSV row equals an uninterrupted run's."""
        return None

    def set_metric_reference(self, ref: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`metric_reference` returned."""

    @torch.no_grad()
    def zero_pruned(self) -> None:
        """Set every masked layer's pruned weights to exactly zero (optimizer momentum and weight decay must not
        revive them under a fixed mask)."""
        for _, layer in self.layers:
            layer.zero_pruned_()

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """Extra parameters (scores, logits) that belong in an optimizer group without weight decay."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_train_end(self, output_dir: str | None) -> None:
        """Write method artifacts (e.g. a found scheme) to the output dir."""


# W * E forward, g * E backward (pruned weights get no gradient): the layers' float-factor implementation.
frozen_masked_weight = frozen_weight

# Every module in this package registers its methods on import: a new method file needs no edit here.
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{_info.name}")
