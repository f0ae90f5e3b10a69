"""`shortcut compare`: runs side by side, per dataset and model variant, aggregated over seeds.

A row is a group of runs with the same identity, which train computed from the resolved config (shortcut.rundir):
the corpus and training setup make the dataset, the resolved model and training length make the variant. Two runs
of one row with the same seed are refused (or the newest kept, duplicates=newest), and an eval.json that no longer
describes its run is refused, so no number in the table is merged or old. A variant's difference is against its
reference, found by identity too (issue 19): the baseline of the same resolved model but the arch's own fields,
trained the same way, never one of another size, or the row `reference=...` names; the table names it. It comes
with a 95% interval and a p-value: a paired t-test over seeds when both rows have the same seeds (same seed, same
batches), Welch's otherwise. With compute_multiplier=true a ladder of baseline sizes gives each variant's compute
multiplier (shortcut.scaling). Each row becomes one typed Entry of the table, which the renderers (Markdown, CSV,
W&B table, plots) read; labels are made from the identity's parts (model choice, settings), never parsed.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from shortcut import compare_adaptive, diskio, rundir
from shortcut.config import CompareJob, Duplicates, RowOrder, UserError
from shortcut.rundir import EvalRecord, Summary
from shortcut.tracking import MetricsLog, open_tracker

log = logging.getLogger(__name__)

# What each domain reports per unit of the data, in order of preference (keys of eval.json).
UNIT_METRIC = {"text": ("bits_per_char",), "music": ("bits_per_note",), "audio": ("nll_per_second",)}


@dataclass
class Run:
    path: Path
    summary: Summary
    eval: dict | None  # eval.json as written (flat keys), checked to describe this run
    metrics: list[dict]

    @property
    def dataset_key(self) -> tuple:
        s = self.summary
        return s.domain, s.source, s.tokenizer, s.data_hash, s.identity.setup_hash

    @property
    def seed(self) -> int:
        return int(self.summary.seed)

    def value(self, key: str) -> float | None:
        v = (self.eval or {}).get(key, getattr(self.summary, key, None))
        return None if v is None else float(v)


@dataclass
class Row:
    dataset: str  # readable, unique among the table's datasets
    key: tuple  # (dataset key, variant hash)
    runs: list[Run] = field(default_factory=list)
    variant: str = ""  # readable, unique within its dataset

    @property
    def summary(self) -> Summary:
        return self.runs[0].summary

    def values(self, key: str) -> dict[int, float]:
        """seed -> value of key, from eval.json (test_nll, bits_per_*) or summary.json (final_val_loss, ...)."""
        return {r.seed: v for r in self.runs if (v := r.value(key)) is not None}


MeanStd = tuple[float, float]  # mean and sample std over seeds (std nan with one seed)


@dataclass
class Entry:
    """One line of the table, for one row: built by `dataset_table` from the row and its reference, filled by the
    steps that add to it (compute multipliers), read by the renderers. summary.json holds to_dict(): every field
    but the row's key, under the names other tools read."""
    key: tuple  # the Row's (dataset key, variant hash)
    dataset: str
    variant: str
    arch: str
    settings_hash: str
    params: int
    non_embedding_params: int
    flops_per_token: int
    train_flops: MeanStd | None
    steps: list[int]  # the steps the seeds ran
    tokens_per_s: float | None  # mean over seeds of each run's median
    seeds: list[int]
    n: int
    val_nll: MeanStd | None
    eval_split: str  # the split eval scored, one per dataset
    test_nll: MeanStd | None  # NLL on eval_split, when every seed has eval.json
    eval_stride: int | None
    mean_context: MeanStd | None
    unit: str | None  # what the dataset reports per unit of its data (bits_per_char, ...), when every run has it
    unit_value: MeanStd | None
    metric: str  # what Δ compares: the eval split's NLL, else (a run without eval.json) final_val_loss
    reference: str | None  # the label of the row Δ is against
    reference_hash: str | None  # its settings hash
    no_delta: str | None  # why a variant has no reference
    is_reference: bool  # some other row's Δ is against this one
    delta: dict | None  # delta(reference's values, this row's)
    compute_multiplier: dict | None = None  # compute_multiplier=true: scaling's result and the ladder's labels
    in_ladder: bool = False  # a rung of a fitted baseline ladder that prices some row
    mean_depth_profile: dict | None = None  # _depth(row)
    runs: list[str] = field(default_factory=list)  # the seeds' run dirs
    adaptive: dict | None = None  # decoding speeds and routing figures (shortcut/compare_adaptive.py)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "key"}


# --- finding runs, refusing what does not hold together -------------------------------------------------------

def find_runs(patterns: str) -> tuple[list[Run], list[str], list[str]]:
    """Runs under the comma-separated globs, dirs that started but never finished, and refusals (old or stale
    records, each naming its run)."""
    roots: set[Path] = set()
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        pattern = os.path.expanduser(pattern)
        roots.update(Path(hit).resolve() for hit in glob.glob(pattern, recursive=True) if os.path.isdir(hit))
    # Walk each tree once: a root inside another root (what `runs/**` matches) is already covered.
    roots = {r for r in roots if not any(parent in roots for parent in r.parents)}
    runs, incomplete, refused = [], [], []
    for root in sorted(roots):
        for d in sorted({root, *root.glob("**/")}):  # glob("**/") yields root itself too
            if rundir.is_run(d):
                if _is_compare_output(d):
                    continue
                try:
                    runs.append(read_run(d))
                except UserError as exc:
                    refused.append(str(exc))
                    continue
                if not runs[-1].summary.finished:
                    s = runs[-1].summary
                    incomplete.append(f"{d} (stopped at step {s.step} of {s.max_steps})")
            elif (msg := rundir.failed_message(d)) is not None:
                incomplete.append(f"{d} (failed: {msg})")
            elif (d / rundir.CKPT).is_dir() or (d / rundir.METRICS).is_file():
                incomplete.append(f"{d} (no summary.json: still running, failed or killed)")
    return runs, incomplete, refused


def _is_compare_output(d: Path) -> bool:
    """compare's own results folder also holds a summary.json: it is not a run."""
    try:
        return json.loads((d / rundir.SUMMARY).read_text()).get("kind") == "compare"
    except (OSError, ValueError, AttributeError):
        return False


def read_run(d: Path) -> Run:
    summary = Summary.read(d)
    record = EvalRecord.read(d)  # refuses another format
    if record is not None and (why := record.stale_reason(summary)):
        raise UserError(f"{d}/eval.json is stale: {why}; run `shortcut eval run_dir={d}` again")
    metrics = MetricsLog.read(d / rundir.METRICS) if (d / rundir.METRICS).is_file() else []
    return Run(d, summary, record.to_dict() if record else None, metrics)


def _dedupe(row_runs: list[Run], policy: Duplicates, notes: list[str], where: str) -> list[Run]:
    by_seed: dict[int, list[Run]] = {}
    for r in row_runs:
        by_seed.setdefault(r.seed, []).append(r)
    dups = {s: rs for s, rs in by_seed.items() if len(rs) > 1}
    if dups and policy == Duplicates.refuse:
        listing = "; ".join(f"seed {s}: {', '.join(str(r.path) for r in rs)}" for s, rs in sorted(dups.items()))
        raise UserError(f"{where} has more than one run of the same seed ({listing}); narrow runs=..., delete "
                        f"the extra runs, or pass duplicates=newest to keep the run that finished last")
    kept = []
    for s, rs in sorted(by_seed.items()):
        rs = sorted(rs, key=lambda r: (r.summary.finished_at, str(r.path)))
        kept.append(rs[-1])
        if len(rs) > 1:
            notes.append(f"{where}, seed {s}: kept {rs[-1].path} (newest), left out "
                         f"{', '.join(str(r.path) for r in rs[:-1])}")
    return kept


def build_rows(runs: list[Run], policy: Duplicates, notes: list[str]) -> list[Row]:
    """Group runs into rows by identity; give datasets and variants readable labels that are unique."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.dataset_key, r.summary.identity.variant_hash), []).append(r)
    datasets: dict[tuple, str] = {}
    for dkey in sorted({k[0] for k in groups}):
        s = next(r.summary for r in runs if r.dataset_key == dkey)
        datasets[dkey] = f"{s.domain}/{s.source}/{s.tokenizer}" + (f" [{s.identity.setup_label}]"
                                                                    if s.identity.setup_label else "")
    _disambiguate(datasets, lambda k, n: f"data {k[3][:n]}, setup {k[4][:n]}")
    rows = []
    for dkey, name in sorted(datasets.items(), key=lambda kv: kv[1]):
        ds_rows = [Row(name, key, runs) for key, runs in groups.items() if key[0] == dkey]
        ids = {row.key: row.summary.identity for row in ds_rows}
        # Settings every row of the dataset shares say nothing about the difference: they go to its heading.
        common = set.intersection(*(set(i.variant_settings) for i in ids.values())) if len(ds_rows) > 1 else set()
        labels = {k: " ".join([i.model_choice, *[p for p in i.variant_settings if p not in common]])
                  for k, i in ids.items()}
        _disambiguate(labels, lambda k, n: f"#{k[1][:n]}")
        if common:
            for row in ds_rows:
                row.dataset = f"{name} {{{' '.join(sorted(common))}}}"
        for row in ds_rows:
            row.variant = labels[row.key]
            row.runs = _dedupe(row.runs, policy, notes, f"{row.dataset} / {row.variant}")
        rows += ds_rows
    return rows


def _disambiguate(labels: dict, suffix) -> None:
    """Different keys that share a readable label get a suffix from their key (a YAML edit, another corpus):
    suffix(key, n) names the key with n characters of its hashes, n growing until the suffixes differ."""
    seen: dict[str, list] = {}
    for k, v in labels.items():
        seen.setdefault(v, []).append(k)
    for v, keys in seen.items():
        if len(keys) > 1:
            n = 6
            while len({suffix(k, n) for k in keys}) < len(keys) and n < 64:
                n += 2
            for k in keys:
                labels[k] = f"{v} ({suffix(k, n)})"


# --- statistics -------------------------------------------------------------------------------------------------

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


def _mean_std(values) -> tuple[float, float] | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


# --- references: which row a row's Δ is measured against (issue 19, item 1) ---------------------------------------

# ModelConfig fields that only mean something for a non-baseline arch (the shortcut's taps, feature map, depth
# embedding, mode, tap bias and shortcut blocks; DenseFormer's averages; Block AttnRes; value residual's init).
# A variant and its reference baseline may differ in these, and in nothing else of the resolved model.
ARCH_KEYS = ("arch", "taps", "feature_map", "feature_hidden", "depth_embedding", "shortcut_mode", "tap_bias",
             "shortcut_layers", "dwa_dilation", "dwa_period", "attnres_block", "value_residual_init", "moda_ffn_kv",
             "laurel", "laurel_rank", "hc_streams", "hc_dynamic", "mhc_sinkhorn_iters")
# Model settings that make a baseline bigger or smaller: a ladder's rungs differ in these, and in nothing else.
SIZE_KEYS = ("n_layer", "n_head", "n_embd", "mlp_hidden", "match_params", "match_by")


@dataclass
class Reference:
    row: Row | None  # the row a row's Δ is against; a baseline's own row when nothing is named (it has no Δ)
    why: str | None = None  # why a variant has none, for the table


def _shared_model(s: Summary) -> dict:
    """The resolved model without what only its arch reads: equal for a variant and its same-size baseline."""
    return {k: v for k, v in s.model.items() if k not in ARCH_KEYS and k not in rundir.EXECUTION_KEYS["model"]}


def _budgeted(s: Summary) -> bool:
    return s.train.get("flops_budget") is not None or s.train.get("match_flops") is not None


def _same_length(a: Summary, b: Summary) -> bool:
    """Trained as long: the same steps; or, where a FLOP budget set a run's steps (train.flops_budget,
    train.match_flops: steps = budget // FLOPs per step), the same training compute within one of its steps."""
    if not _budgeted(a) and not _budgeted(b):
        return a.max_steps == b.max_steps
    planned = lambda s: s.max_steps * s.tokens_per_step * s.train_flops_per_token  # noqa: E731
    step = max(s.tokens_per_step * s.train_flops_per_token for s in (a, b) if _budgeted(s))
    return abs(planned(a) - planned(b)) < step


def _why_none(row: Row, baselines: list[Row]) -> str:
    """A variant with no reference says what the nearest baseline differs in."""
    if not baselines:
        return "no baseline row in this dataset"
    mine = _shared_model(row.summary)
    diffs = {b.key: sorted(k for k in {*mine, *_shared_model(b.summary)}
                           if mine.get(k) != b.summary.model.get(k)) for b in baselines}
    near = min(baselines, key=lambda b: (len(diffs[b.key]), b.variant))
    if not diffs[near.key]:
        return (f"no baseline trained as long ({row.summary.max_steps} steps; {near.variant}: "
                f"{near.summary.max_steps})")
    shown = ", ".join(f"model.{k}={_plain(mine.get(k))} (vs {_plain(near.summary.model.get(k))})"
                      for k in diffs[near.key])
    what = "of the same size" if set(diffs[near.key]) & {*SIZE_KEYS, "block_size"} else "of the same model"
    return f"no baseline {what}: {shown} against the nearest, {near.variant}"


def _plain(v) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def _named(ds_rows: list[Row], name: str) -> Row | None:
    """The row `compare reference=NAME` names: its label as the table shows it, else its model choice (when one row
    has it), else a prefix (6+ characters) of its settings hash."""
    for found in ([r for r in ds_rows if r.variant == name],
                  [r for r in ds_rows if r.summary.identity.model_choice == name],
                  [r for r in ds_rows if len(name) >= 6 and r.summary.identity.settings_hash.startswith(name)]):
        if len(found) > 1:
            raise UserError(f"reference={name} names {len(found)} rows of {ds_rows[0].dataset} "
                            f"({', '.join(sorted(r.variant for r in found))}); name one by its label as the table "
                            f"shows it (reference='{found[0].variant}') or by its settings_hash")
        if found:
            return found[0]
    return None


def references(ds_rows: list[Row], name: str | None, notes: list[str]) -> dict[tuple, Reference]:
    """Each row's reference: the one `reference=NAME` names, else, for a variant, the baseline of the same resolved
    model but its arch's own fields, trained on the same setup (its dataset) as long; never one of another size."""
    if name is not None:
        ref = _named(ds_rows, name)
        return {r.key: Reference(ref, None if ref else f"reference={name} is not a row of this dataset")
                for r in ds_rows}
    baselines = [r for r in ds_rows if r.summary.arch == "baseline"]
    out = {}
    for row in ds_rows:
        if row.summary.arch == "baseline":
            out[row.key] = Reference(row)
            continue
        same = [b for b in baselines if _shared_model(b.summary) == _shared_model(row.summary)
                and _same_length(b.summary, row.summary)]
        # Baselines that differ only in fields a baseline never reads are one model: the one sharing most seeds.
        seeds = {r.seed for r in row.runs}
        same.sort(key=lambda b: (-len(seeds & {r.seed for r in b.runs}), b.variant))
        if len(same) > 1:
            notes.append(f"{row.dataset}: {row.variant} has {len(same)} equal baselines "
                         f"({', '.join(b.variant for b in same)}); measured against {same[0].variant}")
        out[row.key] = Reference(same[0]) if same else Reference(None, _why_none(row, baselines))
    return out


def _eval_settings(ds_rows: list[Row]) -> None:
    """Test numbers of one dataset must come from one evaluation protocol."""
    settings: dict[tuple, list[str]] = {}
    for row in ds_rows:
        for r in row.runs:
            if r.eval:
                key = (r.eval["split"], r.eval["stride"], r.eval["max_tokens"], r.eval.get("precision"))
                settings.setdefault(key, []).append(str(r.path))
    if len(settings) > 1:
        shown = "; ".join(f"split={k[0]} stride={k[1]} max_tokens={k[2]} precision={k[3]}: {', '.join(v[:2])}"
                          + (f" (+{len(v) - 2})" if len(v) > 2 else "") for k, v in settings.items())
        raise UserError(f"{ds_rows[0].dataset}: runs were evaluated with different settings ({shown}); "
                        f"evaluate them again with the same eval.stride and eval.max_tokens")


# What makes a model adaptive (routing, early-exit training): such a row, a baseline's too, is priced on the ladder
# of *dense* baselines, so its compute multiplier answers "on, above or below the dense loss-vs-compute curve".
ADAPTIVE_KEYS = ("mod_capacity", "mod_every", "mod_aux_weight", "exit_train")


def _dense(s: Summary) -> bool:
    return s.model.get("mod_capacity") is None and not s.model.get("exit_train")


def _ladder_key(row: Row) -> str:
    """Rows of one architecture up to size, the arch's own fields and its adaptive ones, that saw as many tokens:
    a baseline ladder's rungs share it, and so does every variant the ladder prices."""
    s = row.summary
    model = {k: v for k, v in _shared_model(s).items() if k not in SIZE_KEYS and k not in ADAPTIVE_KEYS}
    return rundir.short_hash([model, s.max_steps * s.tokens_per_step])  # the same architecture, the same tokens


def compute_multipliers(ds_rows: list[Row], metric: str, out_png: Path, notes: list[str]
                        ) -> tuple[dict[tuple, dict], set[tuple]]:
    """For every row but a dense baseline's: the ladder of dense baseline rows that differ from it only in size, the
    arch's own fields and its adaptive ones (routing, exit training; saw as many tokens), fitted, and the row's
    multiplier on it (training FLOPs: a routed run's are its capacity's). It needs no baseline of its own size.
    Returns the multipliers by row key (each with its ladder's labels) and the keys of the rungs of the ladders that
    priced a row. Draws loss vs compute for the largest ladder."""
    from shortcut import scaling

    def points(row: Row) -> list[scaling.Point]:
        return [scaling.Point(r.seed, r.summary.train_flops, v) for r in row.runs if (v := r.value(metric)) is not None]

    def rung(row: Row) -> bool:
        return row.summary.arch == "baseline" and _dense(row.summary)

    out, ladders, priced_by = {}, {}, {}
    for row in ds_rows:
        if rung(row):
            continue
        key = _ladder_key(row)
        if key not in ladders:
            rungs = [r for r in ds_rows if rung(r) and _ladder_key(r) == key]
            ladders[key] = (rungs, None)
            try:
                ladders[key] = (rungs, scaling.fit_power_law([p for r in rungs for p in points(r)]))
            except UserError as exc:
                notes.append(f"{ds_rows[0].dataset}: no compute multiplier for {row.variant} and the rows that share "
                             f"its baseline ladder ({len(rungs)} dense baseline row(s) differ from it only in size "
                             f"and its routing or exit settings): {exc}")
        rungs, fit = ladders[key]
        if fit is not None:
            out[row.key] = {**scaling.compute_multiplier([p for r in rungs for p in points(r)], points(row)),
                            "ladder": [r.variant for r in rungs]}
            priced_by[row.key] = key
    if ladders:
        largest = max(ladders, key=lambda k: len(ladders[k][0]))
        rungs, fit = ladders[largest]
        labels = {f"{r.variant}: ×{out[r.key]['multiplier']:.2f}": points(r) for r in ds_rows
                  if priced_by.get(r.key) == largest}
        scaling.plot_loss_vs_compute([p for r in rungs for p in points(r)], fit, labels, out_png,
                                     title=f"{ds_rows[0].dataset}\n{metric} vs training compute; curve: the baseline "
                                           f"ladder ({len(rungs)} sizes, in table.md)")
    return out, {r.key for key in set(priced_by.values()) for r in ladders[key][0]}


# --- the command ----------------------------------------------------------------------------------------------

def compare(job: CompareJob) -> dict:
    notes: list[str] = []
    rows, refs, incomplete = gather(job, notes)
    out_dir = _output_dir(job)
    datasets = sorted({r.dataset for r in rows})
    table, pictures = [], []
    for i, ds in enumerate(datasets):
        png = out_dir / ("loss_vs_compute.png" if len(datasets) == 1 else f"loss_vs_compute_{i}.png")
        table += dataset_entries([r for r in rows if r.dataset == ds], refs, job, png, notes)
        if png.is_file():
            pictures.append(png)
    pictures += early_exit_curves(rows, datasets, out_dir, notes)
    return write_results(job, out_dir, table, rows, notes, incomplete, pictures)


def gather(job: CompareJob, notes: list[str]) -> tuple[list[Row], dict[tuple, Reference], list[str]]:
    """The rows to show (runs found, grouped by identity, selected) with their references, and the runs that did
    not finish; runs that cannot be compared, or none at all, end in one line."""
    runs, incomplete, refused = find_runs(job.runs)
    if refused:
        raise UserError(f"{len(refused)} run(s) cannot be compared: " + "; ".join(refused[:5])
                        + (f"; and {len(refused) - 5} more" if len(refused) > 5 else ""))
    rows, refs = select(build_rows(runs, job.duplicates, notes), job, notes)
    if not rows:
        raise UserError(f"no finished runs match runs={job.runs!r}"
                        + (f" and variants {list(job.variants)}" if job.variants else "")
                        + "; train some first (shortcut train ...) or point runs= at their directories"
                        + (f" (unfinished: {'; '.join(incomplete[:3])})" if incomplete else ""))
    return rows, refs, incomplete


def _output_dir(job: CompareJob) -> Path:
    """results_root/name, without the pictures or W&B run of an earlier comparison: it never shows another's."""
    out_dir = Path(job.results_root) / job.name
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("*.png"), out_dir / rundir.WANDB_ID]:
        old.unlink(missing_ok=True)
    return out_dir


def dataset_entries(ds_rows: list[Row], refs: dict[tuple, Reference], job: CompareJob, png: Path,
                    notes: list[str]) -> list[Entry]:
    """One dataset's entries (the baseline first, then by label); with compute_multiplier=true each variant's
    multiplier on its baseline ladder (drawn to png) and the ladders' rungs marked; in the order sort= asks for."""
    ds_rows = sorted(ds_rows, key=lambda r: (r.summary.arch != "baseline", r.variant))
    _eval_settings(ds_rows)
    entries = dataset_table(ds_rows, refs, notes)
    if job.compute_multiplier:
        found, rungs = compute_multipliers(ds_rows, entries[0].metric, png, notes)
        for e in entries:
            e.compute_multiplier, e.in_ladder = found.get(e.key), e.key in rungs
        _chosen_on_validation(entries, notes)
    if job.sort == RowOrder.multiplier:
        entries.sort(key=_by_multiplier)
    return entries


def write_results(job: CompareJob, out_dir: Path, table: list[Entry], rows: list[Row], notes: list[str],
                  incomplete: list[str], pictures: list[Path]) -> dict:
    """table.md (also printed), table.csv, the plots, summary.json and the W&B run; returns what summary.json holds."""
    from shortcut.robustness_table import robustness_tables  # eval.noise / eval.shift conditions (issue 23)

    robust_md, robust_pictures, robust_rows = robustness_tables(
        [(r.dataset, r.variant, [(run.seed, run.eval) for run in r.runs]) for r in rows], out_dir)
    md = render_markdown(table, notes, incomplete, job.compute_multiplier, job.reference) + robust_md
    _write(out_dir / "table.md", md)
    _write_csv(out_dir / "table.csv", table)
    pictures = pictures + robust_pictures + plot(table, rows, out_dir)
    summary = {"kind": "compare", "rows": [e.to_dict() for e in table], "notes": notes, "incomplete": incomplete,
               "pictures": [str(p) for p in pictures], "robustness": robust_rows}
    _write(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    track(job, out_dir, table, pictures)
    print(md)
    for row in rows:
        for p in sorted(r.path / rundir.AUDIT / "depth_profile.png" for r in row.runs):
            if p.is_file():
                print(f"depth audit picture ({row.dataset}, {row.variant}): {p}")
                break
    print(f"\nwrote {out_dir}/table.md, table.csv, summary.json and {len(pictures)} plot(s)")
    return summary


def select(rows: list[Row], job: CompareJob, notes: list[str]) -> tuple[list[Row], dict[tuple, Reference]]:
    """The rows `variants` asks for (all by default: by label, or by model choice) and each row's reference, found
    among every row of its dataset: a reference the selection left out comes back, so that no Δ is against a row
    the table does not show."""
    refs: dict[tuple, Reference] = {}
    for ds in sorted({r.dataset for r in rows}):
        refs.update(references([r for r in rows if r.dataset == ds], job.reference, notes))
    if job.reference is not None and rows and not any(ref.row for ref in refs.values()):
        shown = sorted({r.variant for r in rows})
        raise UserError(f"reference={job.reference} names no row of this comparison; name one of "
                        f"{', '.join(shown[:8])}{' ...' if len(shown) > 8 else ''} (a label, a model choice or a "
                        f"settings hash prefix)")
    if not job.variants:
        return rows, refs
    wanted = set(job.variants)
    chosen = [r for r in rows if r.variant in wanted or r.summary.identity.model_choice in wanted]
    for ref in dict.fromkeys(refs[r.key].row.key for r in chosen if refs[r.key].row is not None):
        row = next(r for r in rows if r.key == ref)
        if all(c.key != ref for c in chosen):
            chosen.append(row)
            notes.append(f"{row.dataset}: {row.variant} is shown as the reference of "
                         f"{', '.join(r.variant for r in chosen if refs[r.key].row is row and r is not row)}")
    return chosen, refs


def early_exit_curves(rows: list[Row], datasets: list[str], out_dir: Path, notes: list[str]) -> list[Path]:
    """Rows whose every run has eval.exit curves: one picture per dataset (NLL vs forward FLOPs per token, the
    seeds averaged; rows without curves as reference points) and a note per row with the compute each policy
    saves at <= 1% more NLL than its own full depth, mean ± std over seeds."""
    from shortcut.early_exit import plot_curves

    pictures = []
    for i, ds in enumerate(datasets):
        ds_rows = [r for r in rows if r.dataset == ds]
        has = {r.key: [bool(run.eval and run.eval.get("exit")) for run in r.runs] for r in ds_rows}
        drawn = [r for r in ds_rows if all(has[r.key])]
        partial = [r for r in ds_rows if any(has[r.key]) and not all(has[r.key])]
        if partial:
            notes.append(f"{ds}: early-exit curves left out for {[r.variant for r in partial]}: only some of their "
                         f"seeds have them; evaluate every seed with the same eval.exit")
        if not drawn:
            continue
        curves = {r.variant: [run.eval["exit"] for run in r.runs] for r in drawn}  # label -> curves, as drawn
        _same_exit_settings(ds, curves)
        first = drawn[0].runs[0].eval["exit"]  # every curve has the same settings (checked above)
        split, n_tokens = first["split"], first["n_tokens"]
        refs = {f"{r.variant} (no exit)": (r.summary.flops_per_token, float(np.mean(list(r.values(f"{split}_nll")
                                                                                             .values()))))
                for r in ds_rows if not any(has[r.key]) and all(run.eval and run.eval["n_tokens"] == n_tokens
                                                                for run in r.runs)}
        png = out_dir / ("exit_curve.png" if len(datasets) == 1 else f"exit_curve_{i}.png")
        pictures.append(plot_curves(curves, png, f"{ds}\nearly exit ({split}; mean over seeds)", refs))
        for row in drawn:
            notes.append(_exit_note(ds, row.variant, curves[row.variant], split))
    return pictures


def _exit_note(ds: str, variant: str, runs: list[dict], split: str) -> str:
    """What each exit policy saves of a row's forward FLOPs at its tolerance, mean ± std over seeds."""
    saved = {p: [c["saved"][p]["saved"] for c in runs if c["saved"].get(p)] for p in ("fixed", "confidence")}
    text = ", ".join(f"{p} exits save {100 * np.mean(v):.1f}%" + (f" ± {100 * np.std(v, ddof=1):.1f}%"
                                                                    if len(v) > 1 else "")
                     for p, v in saved.items() if v)
    return (f"{ds}: early exit of {variant} (exit_train={runs[0]['exit_train']}, {len(runs)} seed(s)):"
            f" at <= {100 * runs[0]['saved']['tolerance']:.0f}% more {split} NLL than its full depth, "
            f"{text} of its forward FLOPs (decisions and copied states counted)")


def _same_exit_settings(ds: str, curves: dict[str, list[dict]]) -> None:
    """Curves drawn and averaged together must measure the same tokens with the same policy and thresholds."""
    key = lambda c: (c["policy"], tuple(c["thresholds"]), c["max_tokens"], c["n_tokens"], c["split"])  # noqa: E731
    found = {key(c) for runs in curves.values() for c in runs}
    if len(found) > 1:
        raise UserError(f"{ds}: early-exit curves were measured with different settings (policy, thresholds, "
                        f"exit_max_tokens, tokens, split: {sorted(found, key=str)}); evaluate them again with the "
                        f"same eval.exit, eval.exit_thresholds and eval.exit_max_tokens")


def _chosen_on_validation(entries: list[Entry], notes: list[str]) -> None:
    """Name the variant a user should believe when many were tried: the best *validation* NLL among the rows that
    are not the baseline ladder, read on its held-out split (choosing the best test number would tune on test)."""
    tried = [e for e in entries if not e.in_ladder and e.arch != "baseline" and e.val_nll is not None]
    if len(tried) < 2:
        return
    best = min(tried, key=lambda e: e.val_nll[0])
    d = best.delta or {}
    held_out = f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d.get("ci_low") is not None else "–"
    notes.append(f"{best.dataset}: chosen on validation NLL among {len(tried)} variants: {best.variant} "
                 f"(val {best.val_nll[0]:.4f}; {best.eval_split} Δ {held_out}, compute multiplier "
                 f"{_fmt_multiplier(best.compute_multiplier)})")


def _by_multiplier(e: Entry) -> tuple:
    """Rows with a compute multiplier first, highest first; then the rest (the ladder) by training compute."""
    m = (e.compute_multiplier or {}).get("multiplier")
    known = m is not None and not math.isnan(m)
    return (not known, -m if known else 0.0, e.train_flops[0] if e.train_flops else 0.0, e.variant)


def dataset_table(ds_rows: list[Row], refs: dict[tuple, Reference], notes: list[str]) -> list[Entry]:
    """The entries of one dataset, in the order of ds_rows, all measured the same way: Δ on the eval split's NLL
    when every run has eval.json (else validation NLL); notes say where that falls short."""
    ds = ds_rows[0].dataset
    split = next((r.eval["split"] for row in ds_rows for r in row.runs if r.eval), "test")
    evaluated = all(r.eval for row in ds_rows for r in row.runs)
    metric = f"{split}_nll" if evaluated else "final_val_loss"
    if not evaluated:
        missing = [str(r.path) for row in ds_rows for r in row.runs if not r.eval]
        notes.append(f"{ds}: {len(missing)} run(s) have no eval.json (e.g. {missing[0]}; shortcut eval run_dir=...):"
                     f" Δ uses validation NLL, and rows with a missing evaluation show none")
    unit_key = next((k for k in UNIT_METRIC.get(ds_rows[0].summary.domain, ()) if all(
        r.eval and k in r.eval for row in ds_rows for r in row.runs)), None)
    seed_sets = {row.variant: sorted(r.seed for r in row.runs) for row in ds_rows}
    if len({tuple(s) for s in seed_sets.values()}) > 1:
        notes.append(f"{ds}: rows have different seeds ({seed_sets}); missing runs make their test unpaired")
    return [_entry(row, ds_rows, refs, split, metric, unit_key, notes) for row in ds_rows]


def _entry(row: Row, ds_rows: list[Row], refs: dict[tuple, Reference], split: str, metric: str, unit_key: str | None,
           notes: list[str]) -> Entry:
    ref = refs[row.key].row
    ref = ref if ref is not row else None  # a baseline is its own reference: it has no Δ
    s0 = row.summary
    return Entry(
        key=row.key, dataset=row.dataset, variant=row.variant, arch=s0.arch, settings_hash=s0.identity.settings_hash,
        params=s0.params, non_embedding_params=s0.non_embedding_params, flops_per_token=s0.flops_per_token,
        train_flops=_mean_std(r.summary.train_flops for r in row.runs),
        steps=sorted({r.summary.step for r in row.runs}), tokens_per_s=_tokens_per_s(row, notes),
        seeds=sorted(r.seed for r in row.runs), n=len(row.runs),
        val_nll=_mean_std(row.values("final_val_loss").values()), eval_split=split,
        test_nll=_mean_std(row.values(f"{split}_nll").values()) if all(r.eval for r in row.runs) else None,
        eval_stride=next((r.eval["stride"] for r in row.runs if r.eval), None),
        mean_context=_mean_std(r.eval["mean_context"] for r in row.runs if r.eval),
        unit=unit_key, unit_value=_mean_std(row.values(unit_key).values()) if unit_key else None, metric=metric,
        reference=ref.variant if ref is not None else None,
        reference_hash=ref.summary.identity.settings_hash if ref is not None else None,
        no_delta=refs[row.key].why, is_reference=any(refs[o.key].row is row and o is not row for o in ds_rows),
        delta=delta(ref.values(metric), row.values(metric)) if ref is not None else None,
        mean_depth_profile=_depth(row), runs=[str(r.path) for r in row.runs],
        adaptive=compare_adaptive.figures([r.eval for r in row.runs]) if all(r.eval for r in row.runs) else None)


def _tokens_per_s(row: Row, notes: list[str]) -> float | None:
    """The mean over seeds of each run's median tokens/s; a note when seeds ran on other devices or kernels."""
    tok_s = [np.median([m["tokens_per_s"] for m in r.metrics if m.get("tokens_per_s")]) for r in row.runs
             if any(m.get("tokens_per_s") for m in r.metrics)]
    ran_on = sorted({(r.summary.device.split(":")[0], " then ".join(r.summary.attn_kernels or ()) or "-")
                     for r in row.runs})  # (device type, attention kernels) of each seed
    if tok_s and len(ran_on) > 1:
        notes.append(f"{row.dataset}, {row.variant}: tokens/s averages seeds run on different devices or attention "
                     f"kernels ({'; '.join(' '.join(x) for x in ran_on)}): the same function, not the same speed")
    return float(np.mean(tok_s)) if tok_s else None


def _depth(row: Row) -> dict | None:
    """The row's mean weight per source layer, averaged over seeds: the audit's `layer_weights` (every variant that
    weighs layers: shortcut attention mass, DWA coefficients, AttnRes / MUDD weights), else the shortcut profile."""
    audits = [(r.eval or {}).get("audit") or {} for r in row.runs]
    weights = [a["layer_weights"] for a in audits if (a.get("layer_weights") or {}).get("mean") is not None]
    if weights and len(weights) == len(audits):
        return {"taps": weights[0]["sources"], "profile": np.mean([w["mean"] for w in weights], axis=0).tolist(),
                "kind": weights[0].get("kind")}
    profiles = [a for a in audits if a.get("mean_profile")]
    if not profiles or len(profiles) < len(audits):
        return None
    return {"taps": profiles[0].get("taps"), "profile": np.mean([a["mean_profile"] for a in profiles], axis=0).tolist(),
            "kind": "shortcut attention mass"}


# --- output ---------------------------------------------------------------------------------------------------

def _fmt(mean_std: tuple[float, float] | None, digits: int = 4) -> str:
    if mean_std is None:
        return "–"
    m, s = mean_std
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _fmt_multiplier(m: dict | None) -> str:
    if not m:
        return "–"
    f = lambda v: "∞" if v is not None and math.isinf(v) else "?" if v is None else f"{v:.2f}"  # noqa: E731
    return f"×{f(m['multiplier'])} [{f(m['ci_low'])}, {f(m['ci_high'])}]" + (" (extrapolated)" if m["extrapolated"]
                                                                             else "")

def _delta_cells(e: Entry) -> tuple[str, str, str]:
    """Δ, p and test of a table row; a row without a Δ says whether it is a reference or why it has none."""
    d = e.delta
    if d is None:
        return ("(reference)" if e.is_reference else f"no Δ: {e.no_delta}" if e.no_delta else ""), "", ""
    if d["ci_low"] is None:
        return f"{d['delta']:+.4f} [no interval]", "–", d["test"]
    return f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]", f"{d['p_value']:.3g}", d["test"]


def render_markdown(table: list[Entry], notes: list[str], incomplete: list[str], multiplier: bool,
                    named: str | None = None) -> str:
    lines = []
    for ds in sorted({e.dataset for e in table}):
        lines += _markdown_table([e for e in table if e.dataset == ds], multiplier)
    lines.append("NLL in nats/token, mean ± sample std over seeds. Δ < 0: lower NLL than the row's reference, "
                 + (f"the row reference={named} names. " if named else
                    "the baseline of the same resolved model but the arch's own settings (same widths, depth, "
                    "context, training setup and length; never another size); `compare reference=LABEL` names "
                    "another. ")
                 + "The interval, not the sign, says whether a difference is real. Settings in {braces} are shared "
                 "by every row of the dataset.")
    if multiplier:
        lines.append("Compute multiplier: baseline training FLOPs that reach the row's loss on the fitted dense "
                     "baseline ladder (power law + constant; routed and exit-trained rows are priced on it too), "
                     "divided by the row's own; > 1 means the variant is worth more compute than it costs. "
                     "Interval: bootstrap over seeds (narrow with 3 seeds: read it as a range).")
    lines += compare_adaptive.markdown(table)
    lines += [f"- note: {n}" for n in notes]
    lines += [f"- incomplete run: {i}" for i in incomplete]
    return "\n".join(lines) + "\n"


def _markdown_table(entries: list[Entry], multiplier: bool) -> list[str]:
    """One dataset's heading, table and evaluation line."""
    first = entries[0]
    unit, split = first.unit or "per unit", first.eval_split
    metric = split if first.metric == f"{split}_nll" else "val"
    extra_h, extra_a = (" compute multiplier [95% CI] |", "---:|") if multiplier else ("", "")
    lines = [f"### {first.dataset}", "",
             f"| variant | params | FLOPs/token | train FLOPs | tokens/s | seeds | val NLL | {split} NLL | {unit} "
             f"| reference | Δ {metric} NLL vs reference [95% CI] | p | test |{extra_h}",
             f"|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---|{extra_a}"]
    for e in entries:
        dtext, ptext, ttext = _delta_cells(e)
        tok_s = f"{e.tokens_per_s:,.0f}" if e.tokens_per_s else "–"
        mult = f" {'ladder' if e.in_ladder else _fmt_multiplier(e.compute_multiplier)} |" if multiplier else ""
        lines.append(f"| {e.variant} | {e.params:,} | {e.flops_per_token:.3g} | "
                     f"{e.train_flops[0]:.3g} | {tok_s} | {','.join(map(str, e.seeds))} | "
                     f"{_fmt(e.val_nll)} | {_fmt(e.test_nll)} | {_fmt(e.unit_value)} | "
                     f"{e.reference or ''} | {dtext} | "
                     f"{ptext} | {ttext} |{mult}")
    if first.eval_stride:
        context = f", mean context {first.mean_context[0]:.0f} tokens" if first.mean_context else ""
        lines += ["", f"{split.capitalize()} NLL: sliding window, stride {first.eval_stride}{context}."]
    return lines + [""]


def _write(path: Path, text: str) -> None:
    diskio.atomic_write(path, text)


CSV_COLUMNS = ["dataset", "variant", "settings_hash", "params", "non_embedding_params", "flops_per_token",
               "train_flops_mean", "tokens_per_s", "n", "seeds", "val_nll_mean", "val_nll_std", "test_nll_mean",
               "test_nll_std", "unit", "unit_mean", "unit_std", "metric", "reference", "reference_hash",
               "is_reference", "no_delta", "delta", "ci_low", "ci_high", "p_value",
               "test", "compute_multiplier", "multiplier_ci_low", "multiplier_ci_high", "eval_stride"]


def _csv_row(e: Entry) -> dict:
    d, m = e.delta or {}, e.compute_multiplier or {}
    pair = lambda v: v or (None, None)  # noqa: E731
    return {"dataset": e.dataset, "variant": e.variant, "settings_hash": e.settings_hash, "params": e.params,
            "non_embedding_params": e.non_embedding_params, "flops_per_token": e.flops_per_token,
            "tokens_per_s": e.tokens_per_s, "n": e.n, "unit": e.unit, "metric": e.metric,
            "eval_stride": e.eval_stride, "reference": e.reference, "reference_hash": e.reference_hash,
            "is_reference": e.is_reference, "no_delta": e.no_delta,
            "seeds": " ".join(map(str, e.seeds)), "train_flops_mean": pair(e.train_flops)[0],
            "val_nll_mean": pair(e.val_nll)[0], "val_nll_std": pair(e.val_nll)[1],
            "test_nll_mean": pair(e.test_nll)[0], "test_nll_std": pair(e.test_nll)[1],
            "unit_mean": pair(e.unit_value)[0], "unit_std": pair(e.unit_value)[1],
            "delta": d.get("delta"), "ci_low": d.get("ci_low"), "ci_high": d.get("ci_high"),
            "p_value": d.get("p_value"), "test": d.get("test"), "compute_multiplier": m.get("multiplier"),
            "multiplier_ci_low": m.get("ci_low"), "multiplier_ci_high": m.get("ci_high")}


def _write_csv(path: Path, table: list[Entry]) -> None:
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, CSV_COLUMNS)
    w.writeheader()
    for e in table:
        w.writerow(_csv_row(e))
    diskio.atomic_write(path, f.getvalue())


def track(job: CompareJob, out_dir: Path, table: list[Entry], pictures: list[Path]) -> None:
    """The table as a wandb.Table and the plots as images, in a W&B run of its own (offline by default)."""
    tracker = open_tracker(job.wandb, out_dir, name=f"compare-{job.name}", config={"runs": job.runs})
    try:
        tracker.table("compare", CSV_COLUMNS, [[_csv_row(e)[c] for c in CSV_COLUMNS] for e in table])
        tracker.images({p.stem: p for p in pictures})
    finally:
        tracker.finish()


def plot(table: list[Entry], rows: list[Row], out_dir: Path) -> list[Path]:
    """Validation loss vs step and vs training FLOPs per dataset (a band over seeds), and mean depth profiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = []
    for i, ds in enumerate(sorted({e.dataset for e in table})):
        pictures.append(_plot_curves([r for r in rows if r.dataset == ds], ds, out_dir / f"curves_{i}.png", plt))
        depth = [e for e in table if e.dataset == ds and e.mean_depth_profile]
        if depth:
            pictures.append(_plot_depth(depth, ds, out_dir / f"depth_{i}.png", plt))
    return pictures + compare_adaptive.plot(table, out_dir, plt)


def _plot_curves(ds_rows: list[Row], ds: str, png: Path, plt) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for row in sorted(ds_rows, key=lambda r: r.variant):
        for ax, xkey in zip(axes, ("step", "train_flops")):
            curves = [{m[xkey]: m["val_loss"] for m in r.metrics if m.get("val_loss") is not None} for r in row.runs]
            xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not xs:
                continue
            ys = np.array([[c[x] for x in xs] for c in curves])
            line, = ax.plot(xs, ys.mean(0), label=f"{row.variant} (n={len(row.runs)})")
            if len(row.runs) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    axes[0].set(xlabel="step", ylabel="validation NLL (nats/token)", title=f"{ds}: band = min..max over seeds")
    axes[1].set(xlabel="training FLOPs", ylabel="validation NLL (nats/token)", xscale="log",
                title=f"{ds}: against training compute")
    axes[0].legend(fontsize=8)
    diskio.save_figure(fig, png, dpi=110)
    plt.close(fig)
    return png


def _plot_depth(entries: list[Entry], ds: str, png: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    width = 0.8 / len(entries)
    sources: set[int] = set()
    for k, e in enumerate(entries):  # bars at their source layer, so rows with other taps line up
        profile = e.mean_depth_profile
        taps = profile["taps"] or list(range(len(profile["profile"])))
        sources.update(taps)
        ax.bar(np.array(taps) + k * width, profile["profile"], width, label=f"{e.variant} ({profile.get('kind')})")
    ticks = sorted(sources)
    ax.set_xticks(np.array(ticks) + 0.4 - width / 2, [f"h{t}" for t in ticks])
    ax.set(xlabel="source layer (h0 = embeddings)", ylabel="mean weight (per method's own scale)",
           title=f"{ds}: which depth the output draws on")
    ax.legend(fontsize=8)
    diskio.save_figure(fig, png, dpi=110)
    plt.close(fig)
    return png
