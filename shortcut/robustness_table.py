"""compare's robustness table (issue 23): per dataset, variants x conditions (noise levels, shifts) from eval.json's
"conditions" (shortcut.robustness), each number a mean over seeds with a 95% t-interval, and one picture.

Three numbers per cell, in three tables: ΔNLL against the run's own in-domain NLL; the shift of the mass on the
shallow taps (layers below L/2; + is toward shallow); the share of early exits that are unsafe (their top-1 differs
from the full model's) at one stated confidence threshold, with its change against in-domain.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

TABLE_THRESHOLD = 0.9  # the exit threshold the table reports (else the nearest one every row measured)

# (dataset, variant, [(seed, eval.json as a dict)]): what compare hands over, one entry per row.
Group = tuple[str, str, list[tuple[int, dict]]]


def interval(values: list[float]) -> dict | None:
    """Mean and 95% t-interval over seeds (no interval from one seed)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None
    m = float(np.mean(v))
    if len(v) < 2:
        return {"mean": m, "ci_low": None, "ci_high": None, "n": 1}
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(v) - 1) * np.std(v, ddof=1) / math.sqrt(len(v)))
    return {"mean": m, "ci_low": m - half, "ci_high": m + half, "n": len(v)}


def _exit_at(cond: dict, threshold: float) -> dict | None:
    return next((e for e in (cond.get("exits") or {}).get("thresholds", []) if e["threshold"] == threshold), None)


def _shallow_shift(cond: dict) -> float | None:
    d = cond.get("depth") or {}
    return ((d.get("shift") or {}).get("shallow_mass") or {}).get("delta")


def _threshold(groups: list[Group]) -> float | None:
    """TABLE_THRESHOLD if every exit-measuring run has it, else the common threshold nearest it."""
    sets = [{e["threshold"] for e in (c.get("exits") or {}).get("thresholds", [])}
            for _, _, runs in groups for _, ev in runs for c in ev["conditions"] if c.get("exits")]
    common = set.intersection(*sets) if sets else set()
    return min(common, key=lambda t: (abs(t - TABLE_THRESHOLD), -t)) if common else None


def dataset_rows(groups: list[Group], names: list[str], threshold: float | None) -> list[dict]:
    """Per variant and condition: the per-seed numbers and their mean and interval."""
    out = []
    for _, variant, runs in groups:
        for name in names:
            conds = [(seed, next((c for c in ev["conditions"] if c["name"] == name), None)) for seed, ev in runs]
            conds = [(s, c) for s, c in conds if c is not None]
            base = {s: ev["conditions"][0] for s, ev in runs}
            unsafe = {s: (_exit_at(c, threshold) or {}).get("unsafe_share") for s, c in conds} if threshold else {}
            d_unsafe = [unsafe[s] - (_exit_at(base[s], threshold) or {}).get("unsafe_share")
                        for s, _ in conds if unsafe.get(s) is not None
                        and (_exit_at(base[s], threshold) or {}).get("unsafe_share") is not None]
            out.append({"variant": variant, "condition": name, "seeds": [s for s, _ in conds],
                        "nll": interval([c["nll"] for _, c in conds]),
                        "delta_nll": interval([c["delta_nll"] for _, c in conds]),
                        "shallow_mass": interval([(c.get("depth") or {}).get("shallow_mass") for _, c in conds]),
                        "shallow_shift": interval([_shallow_shift(c) for _, c in conds]),
                        "unsafe_share": interval(list(unsafe.values())), "threshold": threshold,
                        "early_share": interval([(_exit_at(c, threshold) or {}).get("early_share")
                                                 for _, c in conds] if threshold else []),
                        "unsafe_delta": interval(d_unsafe),
                        "unknown_rate": interval([(c.get("unknown") or {}).get("rate") for _, c in conds])})
    return out


def _cell(iv: dict | None, signed: bool = True, digits: int = 4) -> str:
    if iv is None:
        return "–"
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    return f(iv["mean"]) + (f" [{f(iv['ci_low'])}, {f(iv['ci_high'])}]" if iv["ci_low"] is not None else "")


def _unsafe(row: dict, change: dict | None) -> str:
    early = row["early_share"]
    if early is None:
        return "–"
    if row["unsafe_share"] is None:
        return "no early exit"
    return (f"{_cell(row['unsafe_share'], False, 3)}" + (f" ({_cell(change, digits=3)})" if change else "")
            + f"; {100 * early['mean']:.1f}% early")


def render(ds: str, rows: list[dict], names: list[str], threshold: float | None, notes: list[str]) -> str:
    shifted = names[1:]
    by = {(r["variant"], r["condition"]): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    head = "| variant | seeds | " + " | ".join(["in-domain", *shifted]) + " |"
    rule = "|---|---|" + "---:|" * len(names)
    lines = [f"### Robustness: {ds}", "", "ΔNLL against in-domain (nats/token; the in-domain column is its NLL):", "",
             head, rule]
    for v in variants:
        base = by[(v, names[0])]
        lines.append(f"| {v} | {','.join(map(str, base['seeds']))} | {_cell(base['nll'], False)} | "
                     + " | ".join(_cell(by[(v, n)]["delta_nll"]) for n in shifted) + " |")
    lines += ["", "Mass on the shallow taps (layers below L/2), and its shift against in-domain (+: toward shallow "
              "taps):", "", head, rule]
    for v in variants:
        base = by[(v, names[0])]
        lines.append(f"| {v} | {','.join(map(str, base['seeds']))} | {_cell(base['shallow_mass'], False, 3)} | "
                     + " | ".join(_cell(by[(v, n)]["shallow_shift"], digits=3) for n in shifted) + " |")
    if threshold is not None:
        lines += ["", f"Unsafe early exits at confidence threshold {threshold:g}: the share of the tokens exiting "
                  "before the full depth whose top-1 differs from the full model's; in parentheses its change "
                  "against in-domain; then the share of all tokens that exit early:", "", head, rule]
        for v in variants:
            base = by[(v, names[0])]
            lines.append(f"| {v} | {','.join(map(str, base['seeds']))} | {_unsafe(base, None)} | "
                         + " | ".join(_unsafe(by[(v, n)], by[(v, n)]["unsafe_delta"]) for n in shifted) + " |")
    lines += ["", "Mean over seeds [95% t-interval over seeds]; each seed's difference is against its own in-domain "
              "numbers on the same protocol (eval.stride, eval.robust_max_tokens). – : not measured (no depth "
              "weights, no exits, or no such condition); no early exit: no token left before the full depth."]
    lines += [f"- note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _notes(groups: list[Group], names: list[str]) -> list[str]:
    """Conditions whose inputs differ between runs (noise not paired) and what the shifted corpora lacked."""
    notes = []
    for name in names:
        conds = [c for _, _, runs in groups for _, ev in runs for c in ev["conditions"] if c["name"] == name]
        if len({c["inputs_hash"] for c in conds}) > 1:
            notes.append(f"{name}: the runs did not read the same inputs (another noise seed, corpus or window cap), "
                         f"so its rows do not pair")
        rates = [c["unknown"]["rate"] for c in conds if c.get("unknown")]
        if rates:
            u = conds[0]["unknown"]
            shown = ", ".join(repr(ch) for ch, _ in u.get("examples", [])[:8])
            notes.append(f"{name}: {100 * float(np.mean(rates)):.2f}% {u['what']}" + (f" (e.g. {shown})" if shown
                                                                                      else "")
                         + (f"; {u['policy']}" if "policy" in u else ""))
    return notes


def robustness_tables(groups: list[Group], out_dir: Path) -> tuple[str, list[Path], list[dict]]:
    """Markdown, pictures and rows for every dataset with conditions (rows without any are left out)."""
    datasets = sorted({ds for ds, _, runs in groups
                       if runs and all((ev or {}).get("conditions") for _, ev in runs)})
    md, pictures, table = [], [], []
    for i, ds in enumerate(datasets):
        mine = [g for g in groups if g[0] == ds and g[2] and all((ev or {}).get("conditions") for _, ev in g[2])]
        names = list(dict.fromkeys(c["name"] for _, _, runs in mine for _, ev in runs for c in ev["conditions"]))
        threshold = _threshold(mine)
        rows = dataset_rows(mine, names, threshold)
        left_out = [v for d, v, runs in groups if d == ds and (v, runs) not in [(g[1], g[2]) for g in mine]]
        notes = _notes(mine, names) + ([f"left out (not every seed has conditions): {', '.join(left_out)}"]
                                       if left_out else [])
        md.append(render(ds, rows, names, threshold, notes))
        png = out_dir / ("robustness.png" if len(datasets) == 1 else f"robustness_{i}.png")
        pictures.append(plot(ds, rows, names, threshold, png))
        table += [{"dataset": ds, **r} for r in rows]
    return "\n".join(md), pictures, table


def plot(ds: str, rows: list[dict], names: list[str], threshold: float | None, path: Path) -> Path:
    """ΔNLL, shallow-mass shift and unsafe-exit share per condition, a marker per variant with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("delta_nll", "ΔNLL vs in-domain (nats/token)"), ("shallow_shift", "shallow-tap mass shift"),
              ("unsafe_share", f"unsafe share of early exits at {threshold:g}" if threshold else "no exits measured")]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    x = np.arange(len(names))
    for k, v in enumerate(variants):
        off = (k - (len(variants) - 1) / 2) * 0.8 / max(1, len(variants))
        for ax, (key, _) in zip(axes, panels):
            pts = [(j, r[key]) for j, n in enumerate(names) for r in rows
                   if r["variant"] == v and r["condition"] == n and r[key] is not None]
            if not pts:
                continue
            m = np.array([iv["mean"] for _, iv in pts])
            lo = np.array([iv["ci_low"] if iv["ci_low"] is not None else iv["mean"] for _, iv in pts])
            hi = np.array([iv["ci_high"] if iv["ci_high"] is not None else iv["mean"] for _, iv in pts])
            ax.errorbar(np.array([j for j, _ in pts]) + off, m, yerr=[m - lo, hi - m], fmt="o", capsize=3,
                        color=f"C{k}", label=v)
    for ax, (_, title) in zip(axes, panels):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(x, [n if len(n) < 24 else "…" + n[-22:] for n in names], rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{ds}: robustness (mean over seeds, 95% interval)", fontsize=9)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
