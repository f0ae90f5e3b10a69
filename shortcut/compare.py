"""`shortcut compare`: runs side by side, per dataset and model variant, aggregated over seeds.

Differences against the baseline row come with a 95% confidence interval and a p-value: a paired t-test over
seeds when both rows have the same seeds (same seed, same training batches), Welch's t-test otherwise. Seed-to-seed
spread at small scale is often larger than the effect, so a difference is never reported without its interval.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shortcut.config import CompareJob, UserError
from shortcut.tracking import MetricsLog

log = logging.getLogger(__name__)

# What each domain reports per unit of the data, in order of preference (keys of eval.json).
UNIT_METRIC = {"text": ("bits_per_char",), "music": ("bits_per_note",), "audio": ("nll_per_second",)}
# train.* overrides that change how a run is executed or logged, not what it learns.
NOT_VARIANT = ("train.resume", "train.device", "train.compile", "train.precision", "train.log_every",
               "train.ckpt_every", "train.keep_ckpts")


@dataclass
class Run:
    path: Path
    summary: dict
    eval: dict | None
    metrics: list[dict]
    depth: dict | None

    @property
    def dataset(self) -> str:
        """domain/source/tokenizer, plus the training setup when it is not the default (runs trained differently,
        e.g. train=smoke against experiment=demo, are never pooled)."""
        s = self.summary
        setup = [f"experiment={s['experiment']}"] if s.get("experiment") else []
        if s.get("train_choice") not in (None, "default"):
            setup.append(f"train={s['train_choice']}")
        setup += sorted(o for o in s.get("overrides", []) if o.startswith("train.") and not o.startswith(NOT_VARIANT))
        return f"{s['domain']}/{s['source']}/{s.get('tokenizer', '?')}" + (f" [{' '.join(setup)}]" if setup else "")

    @property
    def variant(self) -> str:
        """The model choice (baseline, shortcut, baseline_matched) plus any model.* overrides."""
        s = self.summary
        extra = sorted(o.lstrip("+") for o in s.get("overrides", []) if o.lstrip("+").startswith("model."))
        return " ".join([s.get("model_choice") or s["arch"], *extra])

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])


@dataclass
class Row:
    dataset: str
    variant: str
    runs: list[Run] = field(default_factory=list)

    def values(self, key: str) -> dict[int, float]:
        """seed -> value of key, from eval.json (test_nll, bits_per_*) or summary.json (final_val_loss, ...)."""
        out = {}
        for r in self.runs:
            v = (r.eval or {}).get(key, r.summary.get(key))
            if v is not None:
                out[r.seed] = float(v)
        return out


def find_runs(patterns: str) -> tuple[list[Run], list[str]]:
    """Run dirs (those with summary.json) under the comma-separated globs, and dirs that started but never finished."""
    roots: set[Path] = set()
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        pattern = os.path.expanduser(pattern)
        roots.update(Path(hit).resolve() for hit in glob.glob(pattern, recursive=True) if os.path.isdir(hit))
    # Walk each tree once: a root inside another root (what `runs/**` matches) is already covered.
    roots = {r for r in roots if not any(parent in roots for parent in r.parents)}
    runs, incomplete = [], []
    for root in sorted(roots):
        for d in [root, *sorted(root.glob("**/"))]:
            if (d / "summary.json").is_file():
                s = json.loads((d / "summary.json").read_text())
                ev = d / "eval.json"
                dj = d / "audit" / "depth.json"
                metrics = MetricsLog.read(d / "metrics.jsonl") if (d / "metrics.jsonl").is_file() else []
                runs.append(Run(d, s, json.loads(ev.read_text()) if ev.is_file() else None, metrics,
                                json.loads(dj.read_text()) if dj.is_file() else None))
                if not s.get("finished", True):
                    incomplete.append(f"{d} (stopped at step {s.get('step')} of {s.get('max_steps')})")
            elif (d / "failed.txt").is_file():
                incomplete.append(f"{d} (failed: {(d / 'failed.txt').read_text().strip()})")
            elif (d / "ckpt").is_dir() or (d / "metrics.jsonl").is_file():
                incomplete.append(f"{d} (no summary.json: still running, failed or killed)")
    return runs, incomplete


def delta(base: dict[int, float], other: dict[int, float]) -> dict:
    """other - base with a 95% CI and a p-value: paired over shared seeds if the seed sets match, else Welch."""
    from scipy import stats

    a, b = list(base.values()), list(other.values())
    result = {"delta": float(np.mean(b) - np.mean(a)) if a and b else None, "ci_low": None, "ci_high": None,
              "p_value": None, "test": "n/a (need 2+ seeds per row)"}
    if set(base) == set(other) and len(base) >= 2:
        seeds = sorted(base)
        t = stats.ttest_rel([other[s] for s in seeds], [base[s] for s in seeds])
        test = f"paired t over {len(seeds)} seeds"
    elif len(a) >= 2 and len(b) >= 2:
        t = stats.ttest_ind(b, a, equal_var=False)
        test = f"Welch t ({len(b)} vs {len(a)} seeds)"
    else:
        return result
    ci = t.confidence_interval(0.95)
    if not math.isfinite(t.pvalue):  # identical values: no spread to test against
        return {**result, "ci_low": result["delta"], "ci_high": result["delta"], "p_value": 1.0, "test": test}
    return {**result, "ci_low": float(ci.low), "ci_high": float(ci.high), "p_value": float(t.pvalue), "test": test}


def val_at_flops(run: Run, flops: float) -> float | None:
    """Validation loss interpolated (linearly) at a cumulative training-FLOP budget, from metrics.jsonl."""
    pts = [(m["train_flops"], m["val_loss"]) for m in run.metrics if m.get("val_loss") is not None]
    if not pts or flops < pts[0][0] or flops > pts[-1][0]:
        return None
    x, y = zip(*pts)
    return float(np.interp(flops, x, y))


def _fmt(mean_std: tuple[float, float] | None, digits: int = 4) -> str:
    if mean_std is None:
        return "–"
    m, s = mean_std
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _mean_std(values) -> tuple[float, float] | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def compare(job: CompareJob) -> dict:
    runs, incomplete = find_runs(job.runs)
    if job.variants:
        wanted = set(job.variants)
        runs = [r for r in runs if r.variant in wanted or r.variant.split()[0] in wanted]
    if not runs:
        raise UserError(f"no finished runs match runs={job.runs!r}"
                        + (f" and variants {list(job.variants)}" if job.variants else "")
                        + "; train some first (shortcut train ...) or point runs= at their directories")
    rows: dict[tuple[str, str], Row] = {}
    for r in runs:
        rows.setdefault((r.dataset, r.variant), Row(r.dataset, r.variant)).runs.append(r)
    datasets = sorted({r.dataset for r in runs})
    for ds in datasets:
        hashes = {r.summary["data_hash"] for r in runs if r.dataset == ds}
        if len(hashes) > 1:
            raise UserError(f"runs for {ds} were trained on different corpora (data hashes {sorted(hashes)}); "
                            f"compare them separately (narrow runs=...)")
    out_dir = Path(job.results_root) / job.name
    out_dir.mkdir(parents=True, exist_ok=True)
    table, notes = [], []
    for ds in datasets:
        ds_rows = sorted((row for (d, _), row in rows.items() if d == ds), key=lambda r: (r.variant != job.baseline,
                                                                                           r.variant))
        budgets = [max((m["train_flops"] for m in r.metrics if m.get("val_loss") is not None), default=0)
                   for row in ds_rows for r in row.runs]
        budget = min(budgets) if budgets and min(budgets) > 0 else None
        all_test = all(r.eval and r.eval.get("test_nll") is not None for row in ds_rows for r in row.runs)
        metric = "test_nll" if all_test else "final_val_loss"
        domain = ds.split("/")[0]  # the setup suffix follows the tokenizer
        unit_key = next((k for k in UNIT_METRIC.get(domain, ()) if all(
            r.eval and k in r.eval for row in ds_rows for r in row.runs)), None)
        seed_sets = {row.variant: sorted(r.seed for r in row.runs) for row in ds_rows}
        if len({tuple(s) for s in seed_sets.values()}) > 1:
            notes.append(f"{ds}: rows have different seeds ({seed_sets}); missing runs make their test unpaired")
        for row in ds_rows:
            ref_name = _reference(row.variant, [r.variant for r in ds_rows], job.baseline)
            ref = next((r for r in ds_rows if r.variant == ref_name), None)
            s0 = row.runs[0].summary
            tok_s = [np.median([m["tokens_per_s"] for m in r.metrics if m.get("tokens_per_s")]) for r in row.runs
                     if any(m.get("tokens_per_s") for m in r.metrics)]
            entry = {
                "dataset": ds, "variant": row.variant, "arch": s0["arch"], "params": s0["params"],
                "non_embedding_params": s0["non_embedding_params"], "flops_per_token": s0["flops_per_token"],
                "tokens_per_s": float(np.mean(tok_s)) if tok_s else None, "seeds": sorted(row.values(metric)),
                "n": len(row.runs), "val_nll": _mean_std(row.values("final_val_loss").values()),
                "test_nll": _mean_std(row.values("test_nll").values()),
                "unit": unit_key, "unit_value": _mean_std(row.values(unit_key).values()) if unit_key else None,
                "metric": metric, "reference": ref_name,
                "delta": None if ref is None or ref is row else delta(ref.values(metric), row.values(metric)),
                "budget_flops": budget,
                "val_at_budget": _mean_std([val_at_flops(r, budget) for r in row.runs]) if budget else None,
                "mean_depth_profile": (np.mean([r.depth["mean_profile"] for r in row.runs if r.depth and
                                                "mean_profile" in r.depth], axis=0).tolist()
                                       if any(r.depth and "mean_profile" in r.depth for r in row.runs) else None),
                "runs": [str(r.path) for r in row.runs],
            }
            table.append(entry)
    md = render_markdown(table, notes, incomplete)
    _write(out_dir / "table.md", md)
    _write_csv(out_dir / "table.csv", table)
    pictures = plot(table, runs, out_dir)
    summary = {"rows": table, "notes": notes, "incomplete": incomplete, "pictures": [str(p) for p in pictures]}
    _write(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    print(md)
    for r in table:
        for p in sorted(r2.path / "audit" / "depth_profile.png" for r2 in rows[(r["dataset"], r["variant"])].runs):
            if p.is_file():
                print(f"depth audit picture ({r['dataset']}, {r['variant']}): {p}")
                break
    print(f"\nwrote {out_dir}/table.md, table.csv, summary.json and {len(pictures)} plot(s)")
    return summary


def _reference(variant: str, names: list[str], baseline: str) -> str | None:
    """The baseline row a variant is measured against: the baseline with the same extra overrides, else the
    plain baseline."""
    extra = variant.split()[1:]
    same = " ".join([baseline, *extra])
    return same if same in names else baseline if baseline in names else None


def render_markdown(table: list[dict], notes: list[str], incomplete: list[str]) -> str:
    lines = []
    for ds in sorted({r["dataset"] for r in table}):
        rows = [r for r in table if r["dataset"] == ds]
        unit, budget = rows[0]["unit"] or "per unit", rows[0]["budget_flops"]
        metric = "test" if rows[0]["metric"] == "test_nll" else "val"
        at = f"{budget:.3g} FLOPs" if budget else "equal FLOPs"
        lines += [f"### {ds}", "",
                  f"| variant | params | FLOPs/token | tokens/s | seeds | val NLL | test NLL | {unit} "
                  f"| Δ {metric} NLL vs baseline [95% CI] | p | test | val NLL @ {at} |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
        for r in rows:
            d = r["delta"]
            if d is None:
                dtext, ptext, ttext = ("(reference)" if r["reference"] == r["variant"] else "no baseline row"), "", ""
            elif d["ci_low"] is None:
                dtext, ptext, ttext = f"{d['delta']:+.4f} [no interval]", "–", d["test"]
            else:
                dtext = f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
                ptext, ttext = f"{d['p_value']:.3g}", d["test"]
            tok_s = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "–"
            lines.append(f"| {r['variant']} | {r['params']:,} | {r['flops_per_token']:.3g} | {tok_s} | "
                         f"{','.join(map(str, r['seeds']))} | {_fmt(r['val_nll'])} | {_fmt(r['test_nll'])} | "
                         f"{_fmt(r['unit_value'])} | {dtext} | {ptext} | {ttext} | {_fmt(r['val_at_budget'])} |")
        lines.append("")
    lines.append("NLL in nats/token, mean ± sample std over seeds. Δ < 0: lower NLL than the baseline row. "
                 "The interval, not the sign, says whether a difference is real.")
    lines += [f"- note: {n}" for n in notes]
    lines += [f"- incomplete run: {i}" for i in incomplete]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_csv(path: Path, table: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    cols = ["dataset", "variant", "params", "non_embedding_params", "flops_per_token", "tokens_per_s", "n", "seeds",
            "val_nll_mean", "val_nll_std", "test_nll_mean", "test_nll_std", "unit", "unit_mean", "unit_std",
            "metric", "delta", "ci_low", "ci_high", "p_value", "test", "budget_flops", "val_at_budget_mean"]
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in table:
            d = r["delta"] or {}
            pair = lambda k: (r[k] or (None, None))  # noqa: E731
            w.writerow({**{k: r[k] for k in ("dataset", "variant", "params", "non_embedding_params", "flops_per_token",
                                              "tokens_per_s", "n", "unit", "metric", "budget_flops")},
                        "seeds": " ".join(map(str, r["seeds"])),
                        "val_nll_mean": pair("val_nll")[0], "val_nll_std": pair("val_nll")[1],
                        "test_nll_mean": pair("test_nll")[0], "test_nll_std": pair("test_nll")[1],
                        "unit_mean": pair("unit_value")[0], "unit_std": pair("unit_value")[1],
                        "delta": d.get("delta"), "ci_low": d.get("ci_low"), "ci_high": d.get("ci_high"),
                        "p_value": d.get("p_value"), "test": d.get("test"),
                        "val_at_budget_mean": pair("val_at_budget")[0]})
    tmp.replace(path)


def plot(table: list[dict], runs: list[Run], out_dir: Path) -> list[Path]:
    """Validation loss vs step and vs training FLOPs per dataset (a band over seeds), and mean depth profiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = []
    by_key = {(r.dataset, r.variant): [] for r in runs}
    for r in runs:
        by_key[(r.dataset, r.variant)].append(r)
    for i, ds in enumerate(sorted({r["dataset"] for r in table})):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
        for (d, variant), group in sorted(by_key.items()):
            if d != ds:
                continue
            for ax, xkey in zip(axes, ("step", "train_flops")):
                curves = [{m[xkey]: m["val_loss"] for m in r.metrics if m.get("val_loss") is not None} for r in group]
                xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
                if not xs:
                    continue
                ys = np.array([[c[x] for x in xs] for c in curves])
                line, = ax.plot(xs, ys.mean(0), label=f"{variant} (n={len(group)})")
                if len(group) > 1:
                    ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        axes[0].set(xlabel="step", ylabel="validation NLL (nats/token)", title=f"{ds}: band = min..max over seeds")
        axes[1].set(xlabel="training FLOPs", ylabel="validation NLL (nats/token)", xscale="log",
                    title=f"{ds}: at equal compute")
        axes[0].legend(fontsize=8)
        pictures.append(out_dir / f"curves_{i}_{ds.replace('/', '_')}.png")
        fig.savefig(pictures[-1], dpi=110)
        plt.close(fig)
        depth_rows = [r for r in table if r["dataset"] == ds and r["mean_depth_profile"]]
        if depth_rows:
            fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
            width = 0.8 / len(depth_rows)
            for k, r in enumerate(depth_rows):
                taps = next(run.depth["taps"] for run in by_key[(ds, r["variant"])] if run.depth and "taps" in run.depth)
                ax.bar(np.arange(len(taps)) + k * width, r["mean_depth_profile"], width, label=r["variant"])
                ax.set_xticks(np.arange(len(taps)) + 0.4 - width / 2, [f"h{t}" for t in taps])
            ax.set(xlabel="tap layer", ylabel="mean attention mass", title=f"{ds}: which depth tokens draw on")
            ax.legend(fontsize=8)
            pictures.append(out_dir / f"depth_{i}_{ds.replace('/', '_')}.png")
            fig.savefig(pictures[-1], dpi=110)
            plt.close(fig)
    return pictures
