"""SparsityController: drives a method's schedules and masks from the train loop, with exact resume."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import UserError
from .layers import layer_kind, masked_modules
from .methods import get_method
from .recipe import Recipe

__all__ = ["SparsityController"]


class SparsityController:
    """Call ``step(global_step)`` before the forward of every optimizer step.

    ``global_step`` counts optimizer steps already taken, so ``step(k)`` prepares forward number ``k`` from the
    weights after ``k`` updates. Calling it twice for the same step is harmless. Masks live in the model's state
    dict (``weight_mask`` buffers); ``state_dict()`` holds the rest, so model + controller state resume exactly.

    Args:
        model: a model already passed through :func:`sparsity.sparsify_`.
        recipe: the same recipe.
        total_steps: optimizer steps of the whole run (phases are fractions of it).
        steps_per_epoch: optimizer steps per epoch (for per-epoch metrics and schedules in epochs).
    """

    def __init__(self, model: nn.Module, recipe: Recipe, total_steps: int, steps_per_epoch: int = 1) -> None:
        self.model = model
        self.recipe = recipe
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self.method = get_method(recipe.method)(recipe.method, model, recipe, total_steps, steps_per_epoch)
        if type(self.method).swaps_layers and getattr(model, "sparsity_recipe", None) is None:
            raise UserError(f"SparsityController: the model was never sparsified for method '{recipe.method}'; "
                            "pass it through sparsify_(model, recipe) first (or build it with sparsity.create_model("
                            "name, recipe=recipe)), else it would train dense")
        self.global_step = 0
        self._last_masks: dict[str, torch.Tensor] | None = None

    @property
    def layers(self):
        return self.method.layers

    def step(self, global_step: int) -> None:
        self.global_step = int(global_step)
        self.method.step(self.global_step)
        if self._last_masks is None and self.global_step == 0:  # a new run: the first flip rate compares with these
            self._last_masks = {fqn: layer.weight_mask.clone() for fqn, layer in self.layers}

    def optimizer_masks(self):
        """The next step's mask computation for the optimizer step before it to run in its own pass over the
        weights (:func:`sparsity.optim.attach_masks`), or None when the method has none ready (then
        ``step(global_step + 1)`` computes it as usual)."""
        fn = getattr(self.method, "optimizer_masks", None)
        return None if fn is None else fn(self.global_step + 1)

    def optimizer_decay(self) -> list:
        """(weight, mask, lambda) of the layers whose gradient the optimizer owes SR-STE's decay term (the method's
        ``move_decay_to_optimizer``); [] for every other method."""
        fn = getattr(self.method, "optimizer_decay", None)
        return [] if fn is None else fn()

    @torch.no_grad()
    def finalize(self, *copies: nn.Module) -> None:
        """End of training: every layer keeps a fixed binary mask (the exported model) and its pruned weights
        are set to exactly zero, so the raw state dict is at the pattern too (the last optimizer step may have
        moved them: momentum). ``copies`` (an EMA copy) get the same masks and zeros."""
        self.method.finalize()
        for other in copies:
            self.sync(other)
        for model in (self.model, *copies):
            for _, layer in masked_modules(model):
                layer.zero_pruned_()

    @torch.no_grad()
    def sync(self, other: nn.Module) -> None:
        """Copy masks and schedule scalars into another copy of the model (an EMA copy, say)."""
        dst = dict(masked_modules(other))
        for fqn, layer in self.layers:
            if fqn in dst:
                self.method.sync(layer, dst[fqn])

    @torch.no_grad()
    def flip_rate(self) -> float:
        """Fraction of mask entries that changed since the last call (the first call of a new run compares with the
        masks of its first step; 0.0 on the first call when there is no reference, e.g. a controller that never
        stepped at step 0)."""
        current = {fqn: layer.weight_mask.clone() for fqn, layer in self.layers}
        if self._last_masks is None:
            self._last_masks = current
            return 0.0
        changed = total = 0
        for fqn, mask in current.items():
            prev = self._last_masks.get(fqn)
            if prev is not None and prev.shape == mask.shape:
                changed += int((prev != mask).sum())
                total += mask.numel()
        self._last_masks = current
        return changed / total if total else 0.0

    def metric_reference(self) -> dict[str, Any]:
        """What the next epoch's change figures compare against: the masks of :meth:`flip_rate` and the method's
        own (:meth:`SparsityMethod.metric_reference`). A mid-epoch checkpoint saves it for an exact CSV."""
        return {"masks": self._last_masks, "method": self.method.metric_reference()}

    def set_metric_reference(self, ref: dict[str, Any]) -> None:
        """Restore :meth:`metric_reference` (masks None: the next :meth:`flip_rate` reports 0.0, as a first epoch)."""
        masks = ref.get("masks")
        if masks is None:
            self._last_masks = None
        else:
            device = {fqn: layer.weight_mask.device for fqn, layer in self.layers}  # a checkpoint loads on the CPU
            self._last_masks = {k: v.to(device.get(k, v.device), copy=True) for k, v in masks.items()}
        if ref.get("method") is not None:
            self.method.set_metric_reference(ref["method"])

    def metrics(self) -> dict[str, Any]:
        """Scalars for summary.csv: ``sparsity`` (pruned fraction of the selected layers' masks),
        ``sparsity_forward`` (zeros in the weights the forward uses: lower while MDGF's beta > 0 or in a dense
        phase) and the method's own figures."""
        kept = nonzero = total = 0
        by_kind: dict[str, list[int]] = {}  # layer type -> [kept, total]
        with torch.no_grad():
            for _, layer in self.layers:
                k = int(layer.weight_mask.sum())
                kept += k
                nonzero += int((layer.sparse_weight() != 0).sum())
                total += layer.weight.numel()
                acc = by_kind.setdefault(layer_kind(layer), [0, 0])
                acc[0] += k
                acc[1] += layer.weight.numel()
        out: dict[str, Any] = {
            "sparsity": round(1.0 - kept / total, 6) if total else 0.0,
            "sparsity_forward": round(1.0 - nonzero / total, 6) if total else 0.0,
        }
        for kind in sorted(by_kind):  # achieved sparsity per layer type: linear, conv1x1, conv (other kernels)
            k, t = by_kind[kind]
            out[f"sparsity_{kind}"] = round(1.0 - k / t, 6)
        out.update(self.method.metrics())
        if (out.get("phase") == "finetune" and self.global_step >= self.total_steps
                and self.method.finetune_start() >= self.total_steps):
            out["phase"] = "end"  # the evaluation after the last step of a run without a fine-tune phase
        return out

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        return self.method.no_weight_decay_params()

    def param_groups(self, weight_decay: float, layer_decay: float | None = None, layer_decay_min_scale: float = 0.0,
                     layer_decay_no_opt_scale: float | None = None) -> list[dict]:
        """timm's weight-decay parameter groups for the model, as ``create_optimizer_v2(model)`` builds them: no
        decay on biases/norms, on what the model's ``no_weight_decay()`` names (a ViT's position embedding and class
        token, Swin's relative position tables) and on the method's extra parameters (scores, logits). What
        train.py and the training benchmark optimize.

        ``layer_decay`` (timm's ``--layer-decay``): timm's layer-wise groups instead, each with its ``lr_scale``
        (timm's schedulers multiply the lr by it); a layer's scores or logits share its scale. As timm's, the scales
        are floored at ``layer_decay_min_scale`` and the parameters whose scale is below ``layer_decay_no_opt_scale``
        are frozen (``requires_grad=False``) and left out."""
        from timm.optim import param_groups_layer_decay, param_groups_weight_decay

        extra = {id(p) for p in self.no_weight_decay_params()}
        names = [n for n, p in self.model.named_parameters() if id(p) in extra]
        names += list(getattr(self.model, "no_weight_decay", lambda: set())())
        if layer_decay is not None:
            return param_groups_layer_decay(self.model, weight_decay, no_weight_decay_list=names,
                                            layer_decay=layer_decay, min_scale=layer_decay_min_scale,
                                            no_opt_scale=layer_decay_no_opt_scale)
        return param_groups_weight_decay(self.model, weight_decay, no_weight_decay_list=names)

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "method": self.recipe.method, "state": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore after the model's state dict is loaded (the flip-rate reference is the loaded masks)."""
        if state.get("method") != self.recipe.method:
            raise ValueError(
                f"controller state is for method {state.get('method')!r} but the recipe says {self.recipe.method!r}; "
                "resume with the recipe the run started with"
            )
        self.global_step = int(state["global_step"])
        self.method.load_state_dict(state.get("state", {}))
        self._last_masks = {fqn: layer.weight_mask.clone() for fqn, layer in self.layers}

    def on_train_end(self, output_dir: str | None) -> None:
        self.method.on_train_end(output_dir)
