"""The compute multiplier: how much more training compute the baseline needs to reach a variant's loss.

A ladder of ≥ 3 baseline sizes trained on the same data is fitted with L(C) = c + a·(C/c0)^(−b) and inverted at the
variant's loss, as Attention Residuals (1.25×) and MUDDFormer (1.8–2.4×) report it; the interval is a bootstrap over
seeds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shortcut import diskio
from shortcut.config import UserError

B_MAX = 5.0  # an exponent above this is not a scaling law any more, it is a cliff
_B_GRID = np.geomspace(1e-3, B_MAX, 96)  # where the profiled initial guess looks for the exponent
_SAME_SIZE_RTOL = 1e-6  # runs of one size may differ in compute by rounding only


@dataclass(frozen=True)
class Point:
    seed: int
    compute: float  # total training FLOPs of the run
    loss: float  # its final loss (test NLL, nats/token)


@dataclass(frozen=True)
class PowerLaw:
    a: float  # scale of the reducible loss at c0 (nats)
    b: float  # exponent of compute
    c: float  # irreducible loss, the asymptote (nats)
    c0: float  # fixed normaliser of compute (FLOPs): the geometric mean of the ladder's sizes

    def loss(self, compute):
        """L(C) = c + a·(C/c0)^(−b); a float for a scalar, an array for an array."""
        x = np.asarray(compute, dtype=float) / self.c0
        out = self.c + self.a * x ** (-self.b)
        return float(out) if out.ndim == 0 else out

    def compute_for(self, loss: float) -> float:
        """The compute at which the curve reaches ``loss``; math.inf at or below the asymptote c."""
        gap = float(loss) - self.c
        if not gap > 0:
            return math.inf
        # log space: (a/gap)^(1/b) overflows for small b long before the answer stops being a float
        log_c = math.log(self.c0) + (math.log(self.a) - math.log(gap)) / self.b
        return math.exp(log_c) if log_c < 709.0 else math.inf


def _sizes(points: list[Point]) -> list[list[Point]]:
    """Points grouped by size (equal compute up to rounding), smallest first."""
    groups: list[list[Point]] = []
    for p in sorted(points, key=lambda p: p.compute):
        if groups and p.compute <= groups[-1][0].compute * (1 + _SAME_SIZE_RTOL):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _check(points: list[Point], what: str) -> None:
    for p in points:
        if not (math.isfinite(p.compute) and p.compute > 0 and math.isfinite(p.loss) and p.loss > 0):
            raise UserError(f"{what} run (seed {p.seed}) has compute={p.compute!r}, loss={p.loss!r}; "
                            "both must be finite and positive")


def _initial_guess(u: np.ndarray, y: np.ndarray, c_max: float) -> tuple[float, float, float]:
    """(a, b, c) from profiling: for each b on a grid, L = c + a·z with z = exp(−b·u) is linear in (a, c)."""
    z = np.exp(-np.outer(_B_GRID, u))  # (n_b, n_points)
    zm, ym = z.mean(1, keepdims=True), y.mean()
    var = ((z - zm) ** 2).sum(1)
    a = np.where(var > 0, ((z - zm) * (y - ym)).sum(1) / np.where(var > 0, var, 1.0), 0.0)
    c = ym - a * zm[:, 0]
    # where the unconstrained answer leaves the bounds, clamp c and refit a with c held
    c = np.clip(c, 0.0, c_max)
    a = np.maximum(((z * (y - c[:, None])).sum(1)) / (z ** 2).sum(1), 1e-12)
    sse = ((c[:, None] + a[:, None] * z - y) ** 2).sum(1)
    i = int(np.argmin(sse))
    return float(a[i]), float(_B_GRID[i]), float(c[i])


def fit_power_law(points: list[Point]) -> PowerLaw:
    """Least-squares fit of L(C) = c + a·(C/c0)^(−b) to every run of the ladder (every seed of every size).

    Conditioning: compute enters as u = ln(C/c0) with c0 the geometric mean of the sizes, so u is O(1) for any
    realistic ladder (±3.5 for 1e12..1e15 FLOPs) and a is the reducible loss at the ladder's centre, O(0.1..1)
    nats like c; the starting point comes from profiling out (a, c), which are linear for a fixed b.
    """
    _check(points, "baseline")
    sizes = _sizes(points)
    if len(sizes) < 3:
        raise UserError(f"a compute multiplier needs a baseline ladder of at least 3 sizes (distinct training "
                        f"compute); got {len(sizes)}")
    means = [(g[0].compute, float(np.mean([p.loss for p in g]))) for g in sizes]
    # Seed noise may make two near rungs (a parameter-matched baseline a few % above another) swap; the fit absorbs
    # that. A ladder whose largest rung is no better than its smallest has no scaling to fit.
    (c_lo, l_lo), (c_hi, l_hi) = means[0], means[-1]
    if not l_hi < l_lo:
        raise UserError(f"the baseline ladder's loss does not fall with compute (mean {l_lo:.4f} at "
                        f"{c_lo:.3g} FLOPs, {l_hi:.4f} at {c_hi:.3g}); a compute multiplier would be meaningless")
    c0 = float(np.exp(np.mean(np.log([c for c, _ in means]))))
    u = np.log(np.array([p.compute for p in points]) / c0)
    y = np.array([p.loss for p in points])
    c_max = float(y.min())

    def model(u, a, b, c):
        return c + a * np.exp(-b * u)

    def jac(u, a, b, c):
        z = np.exp(-b * u)
        return np.stack([z, -a * u * z, np.ones_like(u)], axis=1)

    lower, upper = np.array([0.0, 0.0, 0.0]), np.array([np.inf, B_MAX, c_max])
    a0, b0, cc0 = _initial_guess(u, y, c_max)
    # strictly inside the box, or least_squares nudges it there itself in a less sensible direction
    p0 = np.clip([a0, b0, cc0], lower + [1e-9, 1e-6, 0.0], upper - [0.0, 1e-6, 1e-9 * c_max])
    from scipy.optimize import curve_fit

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "covariance could not be estimated": we do not use it
            popt, _ = curve_fit(model, u, y, p0=p0, bounds=(lower, upper), jac=jac, method="trf", max_nfev=2000)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"the power-law fit of the baseline ladder failed: {str(exc).splitlines()[0]}") from None
    a, b, c = map(float, popt)
    if not (all(map(math.isfinite, (a, b, c))) and a > 0 and b > 0):
        raise UserError(f"the power-law fit of the baseline ladder did not converge (a={a:.3g}, b={b:.3g}, c={c:.3g})")
    return PowerLaw(a=a, b=b, c=c, c0=c0)


def _multiplier(fit: PowerLaw, variant_loss: float, variant_compute: float) -> tuple[float, float]:
    equivalent = fit.compute_for(variant_loss)
    return equivalent, equivalent / variant_compute


def _order_statistic(sorted_values: np.ndarray, q: float, side: str) -> float:
    """A percentile without interpolation, so an infinite tail stays inf instead of turning into nan."""
    pos = q * (len(sorted_values) - 1)
    return float(sorted_values[math.floor(pos) if side == "low" else math.ceil(pos)])


def compute_multiplier(ladder: list[Point], variant: list[Point], n_boot: int = 1000, seed: int = 0) -> dict:
    """C_baseline(mean variant loss) / mean variant compute, with a 95% percentile bootstrap interval over seeds.

    A resample draws seed ids with replacement from every seed present (ladder or variant), refits the ladder on
    the drawn seeds' runs (a seed drawn twice counts twice) and re-averages the variant over them; a resample whose
    fit fails, or that holds no variant run, is dropped (n_boot_ok counts the rest). Seeds shared between the
    ladder and the variant stay paired, as they saw the same batches. The fit depends on the drawn multiset only,
    so each distinct multiset is fitted once.
    """
    if not variant:
        raise UserError("a compute multiplier needs at least one variant run")
    _check(variant, "variant")
    fit = fit_power_law(ladder)
    v_loss = float(np.mean([p.loss for p in variant]))
    v_compute = float(np.mean([p.compute for p in variant]))
    equivalent, multiplier = _multiplier(fit, v_loss, v_compute)
    c_min, c_max = min(p.compute for p in ladder), max(p.compute for p in ladder)
    extrapolated = not (fit.loss(c_max) <= v_loss <= fit.loss(c_min))

    seeds = sorted({p.seed for p in ladder} | {p.seed for p in variant})
    ladder_by, variant_by = {s: [] for s in seeds}, {s: [] for s in seeds}
    for p in ladder:
        ladder_by[p.seed].append(p)
    for p in variant:
        variant_by[p.seed].append(p)
    rng = np.random.default_rng(seed)
    cache: dict[tuple[int, ...], float | None] = {}
    boot = []
    for _ in range(n_boot):
        draw = tuple(sorted(rng.choice(len(seeds), size=len(seeds), replace=True).tolist()))
        if draw not in cache:
            v = [p for i in draw for p in variant_by[seeds[i]]]
            try:
                f = fit_power_law([p for i in draw for p in ladder_by[seeds[i]]]) if v else None
            except UserError:
                f = None
            cache[draw] = None if f is None else _multiplier(f, float(np.mean([p.loss for p in v])),
                                                             float(np.mean([p.compute for p in v])))[1]
        if cache[draw] is not None:
            boot.append(cache[draw])
    boot_sorted = np.sort(np.array(boot, dtype=float))
    ci = ((_order_statistic(boot_sorted, 0.025, "low"), _order_statistic(boot_sorted, 0.975, "high"))
          if len(boot_sorted) else (None, None))
    return {"multiplier": multiplier, "ci_low": ci[0], "ci_high": ci[1], "extrapolated": bool(extrapolated),
            "fit": asdict(fit), "n_seeds": len(seeds), "n_boot": n_boot, "n_boot_ok": len(boot),
            "variant_loss": v_loss, "variant_compute": v_compute, "equivalent_compute": equivalent}


def plot_loss_vs_compute(ladder: list[Point], fit: PowerLaw | None, variants: dict[str, list[Point]],
                         path: Path, title: str = "") -> Path:
    """Test NLL against training FLOPs (log x): the ladder's runs, its fitted curve, each variant's runs."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to disturb

    path = Path(path)
    many = len(variants) > 6  # a search: the legend goes beside the axes, not over the points
    fig = Figure(figsize=(12, 5.5) if many else (6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    if ladder:
        ax.scatter([p.compute for p in ladder], [p.loss for p in ladder], s=18, color="0.25", zorder=3,
                   label=f"baseline ladder (n={len(ladder)})")
    all_compute = [p.compute for p in ladder] + [p.compute for pts in variants.values() for p in pts]
    if fit is not None and all_compute:
        lo, hi = min(all_compute) / 2, max(all_compute) * 2
        xs = np.geomspace(lo, hi, 200)
        ax.plot(xs, fit.loss(xs), color="0.25", lw=1.2,
                label=f"fit: {fit.c:.3f} + {fit.a:.3f}·(C/{fit.c0:.2g})^−{fit.b:.3f}")
        losses = [p.loss for p in ladder] + [p.loss for pts in variants.values() for p in pts]
        if losses and fit.c >= min(losses) - (max(losses) - min(losses)):  # else it would squash the points
            ax.axhline(fit.c, color="0.6", lw=0.8, ls=":", label=f"asymptote c = {fit.c:.3f}")
    markers = "osD^v<>p*h"
    colours = [f"C{i}" for i in range(10)]
    for i, (label, pts) in enumerate(variants.items()):
        ax.scatter([p.compute for p in pts], [p.loss for p in pts], s=42, marker=markers[i % len(markers)],
                   color=colours[i % len(colours)], edgecolor="black", linewidth=0.5, zorder=4, label=label)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="test NLL (nats/token)", title=title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7 if many else 8, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if many else {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    diskio.save_figure(fig, path, dpi=110)
    return path
