"""Sparsity-aware training of timm vision models: N:M, block and learned masks under one recipe format.

Public API (DESIGN.md section 3)::

    recipe = sparsity.load_recipe("configs/quickstart/vit_digits_2of4.yaml")
    sparsity.sparsify_(model, recipe)
    ctl = sparsity.SparsityController(model, recipe, total_steps=..., steps_per_epoch=...)
    ctl.step(global_step)
    sparsity.sparsity_report(model)
    sparsity.densify_(model)
"""

from .accelerate import accelerate_
from .checkpoint import CheckpointError, load_model_weights, model_from_checkpoint, save_atomic
from .controller import SparsityController
from .export import export_compressed, export_densified, load_compressed, load_densified
from .factory import create_model
from .layers import MaskedConv2d, MaskedLinear, SliceSpec, loss_scale, masked_modules
from .masks import block_mask, conv_nm_mask, is_nm, linear_nm_mask, nm_mask, tile_mask, unstructured_mask, weight_is_nm
from .methods import METHODS, SparsityMethod, register_method
from .recipe import Recipe, RecipeError, Rule, load_recipe, load_yaml, recipe_from_dict
from .report import format_report, overall_sparsity, sparsity_report
from .surgery import densify_, sparsify_

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "METHODS", "MaskedConv2d", "create_model", "load_model_weights", "model_from_checkpoint",
    "save_atomic", "MaskedLinear", "Recipe", "RecipeError", "Rule", "SliceSpec", "SparsityController",
    "SparsityMethod", "block_mask", "conv_nm_mask", "densify_", "format_report", "is_nm", "linear_nm_mask",
    "load_recipe", "load_yaml", "masked_modules", "nm_mask", "overall_sparsity", "recipe_from_dict",
    "register_method", "sparsify_", "sparsity_report", "tile_mask", "unstructured_mask", "weight_is_nm",
    "accelerate_", "export_compressed", "export_densified", "load_compressed", "load_densified", "loss_scale",
]
