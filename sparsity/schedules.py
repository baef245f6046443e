"""Schedules as pure functions of the global step (DESIGN.md section 4).

``global_step`` counts optimizer steps already taken: ``step(k)`` prepares the model for forward number ``k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "Phase",
    "phase_at",
    "mdgf_beta",
    "sdgf_ladder",
    "ladder_pattern",
    "cubic_sparsity",
    "linear_ramp",
]

DENSE, SPARSE, FINETUNE = "dense", "sparse", "finetune"


@dataclass(frozen=True)
class Phase:
    """Where a step falls: ``name`` in dense|sparse|finetune, ``t`` steps since the sparse phase began,
    and the sparse window ``[sparse_start, finetune_start)``."""

    name: str
    t: int
    sparse_start: int
    finetune_start: int


def phase_at(global_step: int, total_steps: int, dense_fraction: float = 0.0, finetune_fraction: float = 0.0) -> Phase:
    """Dense first (no mask), then the sparse window, then fine-tune with a binary mask."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    sparse_start = int(round(dense_fraction * total_steps))
    finetune_start = max(sparse_start, total_steps - int(round(finetune_fraction * total_steps)))
    t = global_step - sparse_start
    if global_step < sparse_start:
        name = DENSE
    elif global_step < finetune_start:
        name = SPARSE
    else:
        name = FINETUNE
    return Phase(name, t, sparse_start, finetune_start)


def mdgf_beta(t: int, decay_type: str, coef: float) -> float:
    """MDGF factor beta_t for pruned weights, t steps into the sparse phase.

    ``step``: 0 (plain STE); ``linear``: max(1 - coef * t, 0); ``exp``: exp(-coef * t).
    """
    t = max(t, 0)
    if decay_type == "step":
        return 0.0
    if decay_type == "linear":
        return max(1.0 - coef * t, 0.0)
    if decay_type == "exp":
        return math.exp(-coef * t)
    raise ValueError(f"decay type must be one of step|linear|exp, got {decay_type!r}")


def sdgf_ladder(n: int, m: int, kind: str | list | tuple) -> list[tuple[int, int]]:
    """SDGF structure-decay ladder ending at the target ``n:m``.

    ``sparsify``: (m-1):m, m/2:m, m/4:m, ... down to n:m (only values above n, then n).
    ``fine``: 8n:8m, 4n:4m, 2n:2m, n:m. ``densify``: n:8m, n:4m, n:2m, n:m.
    An explicit list of ``[n, m]`` pairs is returned as given (it must end at the target).
    ``none`` gives the target alone.
    """
    if isinstance(kind, (list, tuple)):
        ladder = [(int(a), int(b)) for a, b in kind]
        if ladder[-1] != (n, m):
            last = f"{ladder[-1][0]}:{ladder[-1][1]}"
            raise ValueError(f"structure_decay list must end at the target {n}:{m}, got {last}")
        return ladder
    if kind in (None, "none"):
        return [(n, m)]
    if kind == "sparsify":
        values: list[int] = []
        for v in [m - 1] + [m // 2**k for k in range(1, m.bit_length())]:
            if v > n and v not in values:
                values.append(v)
        return [(v, m) for v in values] + [(n, m)]
    if kind == "fine":
        return [(8 * n, 8 * m), (4 * n, 4 * m), (2 * n, 2 * m), (n, m)]
    if kind == "densify":
        return [(n, 8 * m), (n, 4 * m), (n, 2 * m), (n, m)]
    raise ValueError(f"structure_decay must be none|sparsify|fine|densify or a list of [n, m], got {kind!r}")


def ladder_pattern(ladder: list[tuple[int, int]], phase: Phase) -> tuple[int, int]:
    """The ladder frame in force: the sparse window is cut into ``len(ladder)`` equal frames."""
    if phase.name != SPARSE:
        return ladder[-1]
    window = max(phase.finetune_start - phase.sparse_start, 1)
    frame = min(phase.t * len(ladder) // window, len(ladder) - 1)
    return ladder[frame]


def cubic_sparsity(global_step: int, start: int, end: int, init_sparsity: float, final_sparsity: float) -> float:
    """Gradual magnitude pruning: s_t = s_f + (s_0 - s_f)(1 - progress)^3, progress clipped to [0, 1]."""
    progress = 1.0 if end <= start else min(max((global_step - start) / (end - start), 0.0), 1.0)
    return final_sparsity + (init_sparsity - final_sparsity) * (1.0 - progress) ** 3


def linear_ramp(global_step: int, start: int, end: int, v0: float, v1: float) -> float:
    """Linear interpolation from ``v0`` at ``start`` to ``v1`` at ``end`` (constant outside)."""
    if end <= start:
        return v1
    progress = min(max((global_step - start) / (end - start), 0.0), 1.0)
    return v0 + (v1 - v0) * progress
