"""Model surgery: swap the layers a recipe selects for masked ones (``sparsify_``) and back (``densify_``)."""

from __future__ import annotations

import logging

from torch import nn

from .layers import MaskedConv2d, MaskedLinear, masked_modules
from .methods import get_method
from .recipe import Recipe, RecipeError
from .targets import find_candidates, match_rules

__all__ = ["sparsify_", "densify_", "set_submodule"]

_logger = logging.getLogger(__name__)


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _bypasses_forward(model: nn.Module, fqn: str) -> None:
    """Swin-V2 attention calls ``F.linear(x, self.qkv.weight, ...)`` unless ``qkv_bias_separate``: make it call
    the module (same math, bias added after) so the mask applies. An instance flag; state-dict keys unchanged."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child == "qkv" and hasattr(parent, "qkv_bias_separate"):
        parent.qkv_bias_separate = True


def sparsify_(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Swap the layers ``recipe`` selects for :class:`MaskedLinear`/:class:`MaskedConv2d`, in place.

    Rules are ordered and the first match wins per unit (a layer, or a q/k/v third of a fused qkv). A layer
    whose grouped dimension is not divisible by M is skipped with a reason, or is an error with ``strict: true``.
    Logs a table of what changed and returns ``model``.
    """
    if masked_modules(model):
        raise ValueError("model is already sparsified; call sparsify_ once per model")
    method = get_method(recipe.method)
    model.sparsity_recipe = recipe  # type: ignore[attr-defined]
    model.sparsity_skipped = {}  # type: ignore[attr-defined]
    if not method.swaps_layers:
        _logger.info("sparsity method %r: model left dense", recipe.method)
        return model
    candidates = find_candidates(model)
    assigned = match_rules(recipe.rules, candidates, recipe.source)
    by_fqn = {c.fqn: c for c in candidates}
    rows, unfit_layers = [], []  # unfit: skipped because their shape refuses the pattern asked of them
    for fqn, units in assigned.items():
        cand = by_fqn[fqn]
        why = method.skip_reason(recipe, fqn, cand.tags)
        if why and any(not recipe.rules[i].skip for *_, i in units):
            model.sparsity_skipped[fqn] = why  # type: ignore[attr-defined]
            continue
        specs, problems, unfit = [], [], False
        for label, start, stop, rule_idx in units:
            rule = recipe.rules[rule_idx]
            if rule.skip:
                continue
            spec = method.slice_spec(recipe, rule, label, start, stop, cand.module)
            policy = method.layer_problem(recipe, cand.module, spec)  # dense on purpose
            problem = policy or method.shape_problem(recipe, cand.module, spec)  # its shape refuses the pattern
            if problem:
                if rule.strict:
                    raise RecipeError(
                        f"{fqn} cannot take {spec.pattern()} (rules[{rule_idx}], strict: true"
                        f"{' in ' + recipe.source if recipe.source else ''}): {problem}; "
                        "change the pattern, exclude the layer, or drop strict"
                    )
                problems.append(f"{label}: {problem}" if label != "all" else problem)
                unfit |= policy is None
                continue
            specs.append(spec)
        if problems:
            model.sparsity_skipped[fqn] = "; ".join(problems)  # type: ignore[attr-defined]
            if unfit:
                unfit_layers.append(fqn)
        if not specs:
            continue
        mod = cand.module
        layer = MaskedLinear.from_dense(mod) if isinstance(mod, nn.Linear) else MaskedConv2d.from_dense(mod)
        layer.slices = tuple(specs)
        layer.method = recipe.method
        method.prepare_layer(recipe, layer)
        set_submodule(model, fqn, layer)
        _bypasses_forward(model, fqn)
        rows.append((fqn, tuple(mod.weight.shape), layer.pattern_label(", ")))
    if unfit_layers and not rows:
        # every selected layer refused the pattern (e.g. M dividing no grouped dimension): the model would train
        # dense while looking like a sparse run. Layers left dense on purpose (supermask at sparsity 0, skip rules)
        # do not count; a recipe that selects nothing is already an error in match_rules.
        fqn = unfit_layers[0]
        raise RecipeError(
            f"the recipe{' in ' + recipe.source if recipe.source else ''} selects {len(unfit_layers)} layer(s) but "
            f"none can take its pattern (e.g. {fqn}: {model.sparsity_skipped[fqn]}), so the model would train "
            "dense; change the rules' n/m or tile, or their targets"
        )
    _log_table(recipe.method, rows, model.sparsity_skipped)  # type: ignore[attr-defined]
    return model


def _log_table(method: str, rows, skipped) -> None:
    if not _logger.isEnabledFor(logging.INFO):
        return
    lines = [f"sparsify_ ({method}): {len(rows)} layers masked, {len(skipped)} skipped"]
    width = max([len(r[0]) for r in rows] + [len(k) for k in skipped] + [10])
    for fqn, shape, pats in rows:
        lines.append(f"  {fqn:<{width}}  {str(list(shape)):<20} {pats}")
    for fqn, why in skipped.items():
        lines.append(f"  {fqn:<{width}}  skipped: {why}")
    _logger.info("\n".join(lines))


def densify_(model: nn.Module) -> nn.Module:
    """Bake masks in (W * E) and put plain ``nn.Linear``/``nn.Conv2d`` back: stock timm state-dict keys."""
    for fqn, layer in masked_modules(model):
        set_submodule(model, fqn, layer.to_dense())
    for attr in ("sparsity_recipe", "sparsity_skipped"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
