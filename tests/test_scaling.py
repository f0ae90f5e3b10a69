"""The compute multiplier: recovery of a known multiplier from a synthetic ladder, inversion, refusals, the plot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shortcut.config import UserError
from shortcut.scaling import Point, PowerLaw, compute_multiplier, fit_power_law, plot_loss_vs_compute

# Realistic magnitudes: 1e12..1e15 FLOPs, losses from ~3.0 down to ~1.1 nats/token.
TRUE = PowerLaw(a=0.5, b=0.4, c=1.0, c0=10 ** 13.5)
SIZES = (1e12, 10 ** 13.5, 1e15)
SEEDS = (0, 1, 2)
C_VARIANT = 2e13


def synthetic(multiplier: float, noise: float = 0.002, noise_seed: int = 1, seeds=SEEDS):
    """A 3-size ladder on the true curve; a variant at C_VARIANT with the curve's loss at multiplier·C_VARIANT."""
    rng = np.random.default_rng(noise_seed)
    ladder = [Point(s, c, TRUE.loss(c) + rng.normal(0, noise)) for c in SIZES for s in seeds]
    variant = [Point(s, C_VARIANT, TRUE.loss(multiplier * C_VARIANT) + rng.normal(0, noise)) for s in seeds]
    return ladder, variant


@pytest.mark.parametrize("multiplier", [0.8, 1.25, 2.0])
def test_recovers_known_multiplier(multiplier):
    # With 3 seeds the 2.5/97.5% points are the extreme single-seed refits (each multiset of one seed has
    # probability 1/27 > 2.5%), so the interval covers the truth ~75% of noise draws (measured over 100 draws:
    # 76-78%; 91% with 10 seeds); the draw here is fixed, and the point estimate is within 2% on ~all draws.
    ladder, variant = synthetic(multiplier)
    r = compute_multiplier(ladder, variant, n_boot=1000)
    assert r["multiplier"] == pytest.approx(multiplier, rel=0.02)
    assert r["ci_low"] <= multiplier <= r["ci_high"]
    assert r["ci_low"] <= r["multiplier"] <= r["ci_high"]
    assert not r["extrapolated"]
    assert r["n_seeds"] == 3 and r["n_boot_ok"] == 1000
    assert r["equivalent_compute"] == pytest.approx(r["multiplier"] * r["variant_compute"])
    assert set(r["fit"]) == {"a", "b", "c", "c0"}
    assert r["fit"]["b"] == pytest.approx(TRUE.b, rel=0.1) and r["fit"]["c"] == pytest.approx(TRUE.c, abs=0.05)


def test_noiseless_fit_is_exact():
    ladder, _ = synthetic(1.0, noise=0.0)
    fit = fit_power_law(ladder)
    for name in ("a", "b", "c", "c0"):
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=1e-5)


@pytest.mark.parametrize("compute", [1e12, 3.3e13, 1e15, 7e17])
def test_inversion(compute):
    law = PowerLaw(a=0.37, b=0.28, c=1.3, c0=3e13)
    assert law.compute_for(law.loss(compute)) == pytest.approx(compute, rel=1e-12)
    assert law.compute_for(law.c) == math.inf and law.compute_for(law.c - 0.1) == math.inf
    xs = np.array([1e12, 1e14])
    assert isinstance(law.loss(xs), np.ndarray) and isinstance(law.loss(1e12), float)


def test_refuses_two_sizes():
    ladder, _ = synthetic(1.0)
    two = [p for p in ladder if p.compute != SIZES[1]]
    with pytest.raises(UserError, match="at least 3 sizes"):
        fit_power_law(two)


def test_refuses_increasing_ladder():
    ladder, variant = synthetic(1.0)
    rising = [Point(p.seed, p.compute, 4.0 - p.loss) for p in ladder]
    with pytest.raises(UserError, match="does not fall with compute"):
        compute_multiplier(rising, variant, n_boot=10)


def test_variant_beyond_asymptote_is_inf():
    ladder, _ = synthetic(1.0)
    variant = [Point(s, C_VARIANT, 0.9) for s in SEEDS]  # below c = 1.0
    r = compute_multiplier(ladder, variant, n_boot=200)
    assert r["multiplier"] == math.inf and r["equivalent_compute"] == math.inf
    assert r["ci_high"] == math.inf and r["extrapolated"]


def test_extrapolated_flag():
    ladder, _ = synthetic(1.0)
    variant = [Point(s, 2e15, TRUE.loss(4e15)) for s in SEEDS]  # better than the largest size
    r = compute_multiplier(ladder, variant, n_boot=50)
    assert r["extrapolated"] and r["multiplier"] == pytest.approx(2.0, rel=0.05)


def test_deterministic():
    ladder, variant = synthetic(1.25, seeds=range(6))
    assert compute_multiplier(ladder, variant, n_boot=300, seed=3) == compute_multiplier(ladder, variant,
                                                                                          n_boot=300, seed=3)


def test_plot_is_written(tmp_path):
    ladder, variant = synthetic(1.25)
    fit = fit_power_law(ladder)
    out = plot_loss_vs_compute(ladder, fit, {"shortcut (1.25×)": variant, "other": variant[:1]},
                               tmp_path / "scaling.png", title="text8")
    assert out == tmp_path / "scaling.png" and out.stat().st_size > 1000
    assert out.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp"))
    assert plot_loss_vs_compute(ladder, None, {}, tmp_path / "bare.png").exists()
