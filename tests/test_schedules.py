import math

import pytest

from sparsity.schedules import cubic_sparsity, ladder_pattern, mdgf_beta, phase_at, sdgf_ladder


def test_mdgf_beta_each_decay_type():
    assert mdgf_beta(0, "step", 2e-4) == 0.0
    assert mdgf_beta(5000, "step", 2e-4) == 0.0
    assert mdgf_beta(0, "linear", 2e-4) == 1.0
    assert mdgf_beta(2500, "linear", 2e-4) == pytest.approx(0.5)
    assert mdgf_beta(6000, "linear", 2e-4) == 0.0  # clipped at 0
    assert mdgf_beta(0, "exp", 1e-4) == 1.0
    assert mdgf_beta(10000, "exp", 1e-4) == pytest.approx(math.exp(-1.0))
    assert mdgf_beta(3000, "exp", 2e-4) == pytest.approx(math.exp(-0.6))


def test_sdgf_ladders_for_1of8_and_2of8():
    assert sdgf_ladder(1, 8, "sparsify") == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert sdgf_ladder(2, 8, "sparsify") == [(7, 8), (4, 8), (2, 8)]
    assert sdgf_ladder(1, 8, "fine") == [(8, 64), (4, 32), (2, 16), (1, 8)]
    assert sdgf_ladder(2, 8, "fine") == [(16, 64), (8, 32), (4, 16), (2, 8)]
    assert sdgf_ladder(1, 8, "densify") == [(1, 64), (1, 32), (1, 16), (1, 8)]
    assert sdgf_ladder(2, 8, "densify") == [(2, 64), (2, 32), (2, 16), (2, 8)]
    assert sdgf_ladder(1, 8, [[7, 8], [4, 8], [2, 8], [1, 8]]) == [(7, 8), (4, 8), (2, 8), (1, 8)]
    with pytest.raises(ValueError, match="end at the target"):
        sdgf_ladder(1, 8, [[7, 8], [4, 8]])


def test_phases_and_frames():
    # 100 steps: 10 dense, 80 sparse, 10 fine-tune
    assert phase_at(0, 100, 0.1, 0.1).name == "dense"
    p = phase_at(10, 100, 0.1, 0.1)
    assert (p.name, p.t) == ("sparse", 0)
    assert phase_at(89, 100, 0.1, 0.1).name == "sparse"
    assert phase_at(90, 100, 0.1, 0.1).name == "finetune"
    ladder = sdgf_ladder(1, 8, "sparsify")
    frames = [ladder_pattern(ladder, phase_at(s, 100, 0.1, 0.1)) for s in (10, 29, 30, 50, 70, 89, 95)]
    assert frames == [(7, 8), (7, 8), (4, 8), (2, 8), (1, 8), (1, 8), (1, 8)]


def test_cubic_sparsity():
    assert cubic_sparsity(0, 0, 100, 0.0, 0.9) == 0.0
    assert cubic_sparsity(50, 0, 100, 0.0, 0.9) == pytest.approx(0.9 - 0.9 * 0.125)
    assert cubic_sparsity(200, 0, 100, 0.0, 0.9) == pytest.approx(0.9)
