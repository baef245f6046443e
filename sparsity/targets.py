"""Which modules of a timm model a rule selects (DESIGN.md section 5).

Selection works on *units*: a whole layer, or one third (``q``/``k``/``v``) of a fused attention ``qkv`` so each
third can get its own pattern inside one layer. Rules are ordered and the first match wins per unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .recipe import RecipeError, Rule

__all__ = ["Candidate", "find_candidates", "match_rules"]

_FF = re.compile(r"(^|.*\.)mlp\.fc[12]$")
_PROJ = re.compile(r"(^|.*\.)attn\.proj$")
_QKV = re.compile(r"(^|.*\.)attn\.qkv$")
_STEM = re.compile(r"^(conv1|stem|patch_embed)(\..*)?$")
_FIRST_BLOCK = re.compile(r"^(.*?\b(?:blocks|layer1)\.0)\.")


@dataclass
class Candidate:
    """A Linear or Conv2d that rules may select, with the target tags it answers to."""

    fqn: str
    module: nn.Module
    tags: set[str] = field(default_factory=set)
    units: tuple[tuple[str, int, int], ...] = ()  # (label, row start, row stop)

    @property
    def is_qkv(self) -> bool:
        return "qkv" in self.tags


def _classifier_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return set()
    try:
        head = get()
    except Exception:  # noqa: BLE001 - a model without a usable classifier simply has no head target
        return set()
    heads = head if isinstance(head, (tuple, list)) else (head,)  # distilled DeiT: (head, head_dist)
    ids = {id(m) for h in heads if isinstance(h, nn.Module) for m in h.modules()}
    return {name for name, mod in model.named_modules() if id(mod) in ids}


def find_candidates(model: nn.Module) -> list[Candidate]:
    """Every plain ``nn.Linear``/``nn.Conv2d`` of ``model`` with its tags, in registration order.

    Subclasses with their own forward (e.g. timm's ``Conv2dSame``, ``StdConv2d``) are not candidates.
    """
    heads = _classifier_names(model)
    found: list[Candidate] = []
    first_block: str | None = None
    for name, mod in model.named_modules():
        if type(mod) not in (nn.Linear, nn.Conv2d):
            continue
        tags: set[str] = set()
        rows = mod.weight.shape[0]
        units: tuple[tuple[str, int, int], ...] = (("all", 0, rows),)
        if type(mod) is nn.Linear:
            tags.add("linear")
            if _FF.match(name):
                tags.add("ff")
            if _PROJ.match(name):
                tags.add("proj")
            if _QKV.match(name) and rows % 3 == 0:
                tags.add("qkv")
                d = rows // 3
                units = (("q", 0, d), ("k", d, 2 * d), ("v", 2 * d, rows))
        else:
            tags.add("conv")
            tags.add("conv1x1" if tuple(mod.kernel_size) == (1, 1) else "conv_kxk")
            if _FF.match(name):
                tags.add("ff")
        if _STEM.match(name):
            tags.add("stem")
        if name in heads:
            tags.add("head")
        if first_block is None:
            fb = _FIRST_BLOCK.match(name)
            if fb:
                first_block = fb.group(1) + "."
        if first_block is not None and name.startswith(first_block):
            tags.add("first_block")
        found.append(Candidate(name, mod, tags, units))
    if found:
        found[-1].tags.add("last_layer")
    return found


def _rule_matches(rule: Rule, cand: Candidate, label: str) -> bool:
    for t in rule.target:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], cand.fqn):
                return True
        elif t in ("q", "k", "v"):
            if cand.is_qkv and label == t:
                return True
        elif t in cand.tags:
            return True
    return False


def match_rules(rules: tuple[Rule, ...], candidates: list[Candidate], source: str | None = None):
    """Assign each unit of each candidate its first matching rule.

    Returns ``{fqn: [(label, start, stop, rule_index), ...]}`` for units matched by any rule (skip rules
    included). A rule that matches no unit at all is an error naming it.
    """
    assigned: dict[str, list[tuple[str, int, int, int]]] = {}
    used = [False] * len(rules)
    for cand in candidates:
        for label, start, stop in cand.units:
            for i, rule in enumerate(rules):
                if _rule_matches(rule, cand, label):
                    used[i] = True
                    assigned.setdefault(cand.fqn, []).append((label, start, stop, i))
                    break
    for i, ok in enumerate(used):
        if not ok:
            # A rule shadowed by earlier rules counts as matching: only a rule that selects nothing at all is wrong.
            if not any(_rule_matches(rules[i], c, lab) for c in candidates for lab, _, _ in c.units):
                where = f" in {source}" if source else ""
                raise RecipeError(
                    f"sparsity.rules[{i}] (target {rules[i].describe()}){where} matches no layer of this model; "
                    "fix the target or remove the rule"
                )
    return assigned
