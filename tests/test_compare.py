"""compare on run directories the tests write with known numbers (through shortcut.rundir, as train and eval do):
statistics against scipy, rows by identity, refusals of duplicates and stale records, the compute multiplier."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from shortcut import rundir
from shortcut.cli import compose
from shortcut.compare import compare, delta, find_runs
from shortcut.config import UserError
from shortcut.rundir import EvalRecord, Identity, Summary

BASE_TEST = {0: 1.50, 1: 1.53, 2: 1.49}
SC_TEST = {0: 1.45, 1: 1.50, 2: 1.46}


def fake_run(root, name, arch, seed, test_nll, data_hash="abc", domain="text", train_flops=3000.0,
             val_curve=(3.0, 2.0, 1.6), label=None, variant_hash=None, setup_label="", setup_hash="s0",
             finished_at="2026-01-01T00:00:00Z", stride=16, evaluated=True, params=None, model=None, split="test",
             device="cpu", attn_kernels=None, train=None, max_steps=30, train_flops_per_token=30):
    """A finished run dir as train and eval write it; the identity is given (train computes it). The resolved
    model holds the label's model.* settings and `model` (as a real run's holds every field)."""
    d = root / name
    d.mkdir(parents=True)
    label = label or arch
    model = {**{k[len("model."):]: _label_value(v) for k, v in (p.split("=", 1) for p in label.split()[1:])
                if k.startswith("model.")}, **(model or {})}
    identity = Identity(setup_hash=setup_hash, variant_hash=variant_hash or f"h-{label}", variant_label=label,
                        setup_label=setup_label, model_choice=label.split()[0])
    Summary(identity=identity, domain=domain, source="files", tokenizer="char", arch=arch, model=model,
            train=train or {}, seed=seed, params=params or (1000 if arch == "baseline" else 1100),
            non_embedding_params=900, flops_per_token=10, train_flops_per_token=train_flops_per_token,
            tokens_per_step=10, max_steps=max_steps, data_hash=data_hash, data_dir="data", git_commit=None,
            device=device, step=max_steps, train_flops=train_flops,
            final_val_loss=val_curve[-1], best_val_loss=min(val_curve), train_time_s=1.0, wall_time_s=1.0,
            finished=True, checkpoint_hash=f"w-{name}", finished_at=finished_at, attn_kernels=attn_kernels).write(d)
    rows = [{"step": 10 * (i + 1), "train_flops": train_flops * (i + 1) / len(val_curve), "val_loss": v,
             "tokens_per_s": 500.0} for i, v in enumerate(val_curve)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evaluated:
        EvalRecord(split=split, nll=test_nll, n_tokens=1000, stride=stride, mean_context=24.0, max_tokens=None,
                   checkpoint_step=30, checkpoint_hash=f"w-{name}", checkpoint="ckpt/step_00000030.pt",
                   data_hash=data_hash, flops_per_token=10, domain=domain, source="files", tokenizer="char",
                   units={"char": {"nll": test_nll, "bits": test_nll / np.log(2)}}).write(d)
    return d


def _label_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


@pytest.fixture
def runs(tmp_path):
    for s in range(3):
        fake_run(tmp_path / "runs", f"b{s}", "baseline", s, BASE_TEST[s], val_curve=(3.0, 2.0, 1.6 + s / 100))
        fake_run(tmp_path / "runs", f"s{s}", "shortcut", s, SC_TEST[s], train_flops=6000.0,
                 val_curve=(2.9, 1.9, 1.5 + s / 100))
    return tmp_path


def job(tmp_path, *overrides):
    return compose("compare", [f"runs={tmp_path / 'runs'}", f"results_root={tmp_path / 'results'}", "wandb=off",
                               *overrides])


def rows_of(summary):
    return {r["variant"]: r for r in summary["rows"]}


def test_tokens_per_s_of_seeds_on_different_kernels_is_flagged(tmp_path):
    """A row's tokens/s is a mean over its seeds: seeds whose attention ran on other kernels (or devices) make it
    a mix, and compare says so (their NLLs stay comparable: attn_impl never changes the function)."""
    for s, kernels in enumerate([["chunked"], ["masked", "chunked"], ["chunked"]]):
        fake_run(tmp_path / "runs", f"s{s}", "shortcut", s, SC_TEST[s], attn_kernels=kernels)
    notes = compare(job(tmp_path))["notes"]
    assert any("different devices or attention kernels (cpu chunked; cpu masked then chunked)" in n for n in notes)
    same = tmp_path / "same"
    for s in range(2):
        fake_run(same / "runs", f"s{s}", "shortcut", s, SC_TEST[s], attn_kernels=["chunked"])
    assert not any("attention kernels" in n for n in compare(job(same))["notes"])


def test_table_statistics_match_scipy(runs):
    summary = compare(job(runs))
    b, s = rows_of(summary)["baseline"], rows_of(summary)["shortcut"]
    assert b["test_nll"][0] == pytest.approx(np.mean(list(BASE_TEST.values())))
    assert b["test_nll"][1] == pytest.approx(np.std(list(BASE_TEST.values()), ddof=1))
    d = s["delta"]
    ref = stats.ttest_rel(list(SC_TEST.values()), list(BASE_TEST.values()))
    assert d["test"].startswith("paired") and d["p_value"] == pytest.approx(ref.pvalue)
    diffs = np.array(list(SC_TEST.values())) - np.array(list(BASE_TEST.values()))
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert s["unit"] == "bits_per_char" and b["delta"] is None
    assert s["train_flops"][0] == 6000.0 and b["train_flops"][0] == 3000.0
    for f in ("table.md", "table.csv", "summary.json"):
        assert (runs / "results" / "compare" / f).is_file()
    assert any("curves" in p for p in summary["pictures"])
    md = (runs / "results" / "compare" / "table.md").read_text()
    assert "paired t over 3 seeds" in md and "(reference)" in md and "stride 16" in md


def test_unpaired_rows_use_welch():
    base, other = {0: 1.0, 1: 1.2, 2: 1.1}, {3: 0.9, 4: 1.0}
    d = delta(base, other)
    ref = stats.ttest_ind(list(other.values()), list(base.values()), equal_var=False)
    assert d["test"].startswith("Welch") and d["p_value"] == pytest.approx(ref.pvalue)
    assert delta({0: 1.0}, {0: 0.9})["ci_low"] is None  # one seed: no interval, and the table says so


def test_duplicate_seeds_are_refused_or_the_newest_kept(runs, tmp_path):
    """Defect 2: a fourth baseline run of seed 1 used to overwrite another in the row (n=4, statistics over 3)."""
    fake_run(tmp_path / "runs", "b1-again", "baseline", 1, 1.70, finished_at="2026-02-01T00:00:00Z")
    with pytest.raises(UserError, match=r"seed 1: .*b1.*b1-again.*duplicates=newest"):
        compare(job(runs))
    summary = compare(job(runs, "duplicates=newest"))
    b = rows_of(summary)["baseline"]
    assert b["n"] == 3 and b["seeds"] == [0, 1, 2] and any("b1-again" in r for r in b["runs"])
    assert b["test_nll"][0] == pytest.approx(np.mean([1.50, 1.70, 1.49]))
    # and the paired test pairs the kept runs
    expect = stats.ttest_rel(list(SC_TEST.values()), [1.50, 1.70, 1.49])
    assert rows_of(summary)["shortcut"]["delta"]["p_value"] == pytest.approx(expect.pvalue)
    assert any("left out" in n and "b1" in n for n in summary["notes"])


def test_rows_are_identities_not_labels(runs, tmp_path):
    """Defect 6: two models with the same readable label (a YAML file edited between runs) never share a row."""
    for s in range(3):
        fake_run(tmp_path / "runs", f"edited{s}", "shortcut", s, 1.2, variant_hash="h-shortcut-edited")
    rows = rows_of(compare(job(runs)))
    assert len(rows) == 3 and all(rows[v]["n"] == 3 for v in rows)
    edited = [v for v in rows if v.startswith("shortcut (#")]
    assert len(edited) == 2, rows.keys()  # both shortcut rows name their hash
    assert sorted(rows[v]["test_nll"][0] for v in edited) == pytest.approx([1.2, np.mean(list(SC_TEST.values()))])


def test_other_corpora_are_other_datasets(runs, tmp_path):
    fake_run(tmp_path / "runs", "odd", "baseline", 7, 1.5, data_hash="other")
    datasets = {r["dataset"] for r in compare(job(runs))["rows"]}
    assert len(datasets) == 2 and all("data" in d for d in datasets)
    with pytest.raises(UserError, match="no finished runs"):
        compare(compose("compare", [f"runs={tmp_path / 'nothing'}/**", "wandb=off"]))


def test_stale_and_old_records_are_refused_naming_the_run(runs, tmp_path):
    """Defect 1: an eval.json of another checkpoint is never reported."""
    ev = tmp_path / "runs" / "s1" / "eval.json"
    record = json.loads(ev.read_text())
    ev.write_text(json.dumps({**record, "checkpoint_hash": "w-some-older-model"}))
    with pytest.raises(UserError, match=r"s1/eval.json is stale: it measured another checkpoint.*shortcut eval"):
        compare(job(runs))
    ev.write_text(json.dumps(record))
    summary = tmp_path / "runs" / "b2" / "summary.json"
    old = json.loads(summary.read_text())
    summary.write_text(json.dumps({k: v for k, v in old.items() if k != "format"}))
    with pytest.raises(UserError, match=r"b2/summary.json was written by an older shortcut"):
        compare(job(runs))


def test_mixed_eval_settings_are_refused(runs, tmp_path):
    fake_run(tmp_path / "runs", "s3", "shortcut", 3, 1.45, stride=32)
    with pytest.raises(UserError, match="different settings.*stride=32"):
        compare(job(runs))


def test_missing_and_unfinished_runs_are_reported(runs, tmp_path):
    (tmp_path / "runs" / "crashed" / "ckpt").mkdir(parents=True)
    rundir.write_failed(tmp_path / "runs" / "broken", "no prepared corpus at data/x")
    _, incomplete, _ = find_runs(str(tmp_path / "runs"))
    assert any("crashed" in i for i in incomplete) and any("broken (failed: no prepared corpus" in i
                                                           for i in incomplete)
    fake_run(tmp_path / "runs", "s9", "shortcut", 9, 1.4)
    summary = compare(job(runs))
    assert any("different seeds" in n for n in summary["notes"])
    assert rows_of(summary)["shortcut"]["delta"]["test"].startswith("Welch")


def test_variants_and_setups_get_their_own_rows(runs, tmp_path):
    for s in range(2):
        fake_run(tmp_path / "runs", f"m{s}", "baseline", s, 1.47, label="baseline_matched")
    fake_run(tmp_path / "runs", "smoke0", "baseline", 0, 2.5, setup_label="train=smoke", setup_hash="s1")
    fake_run(tmp_path / "runs", "lr", "shortcut", 0, 2.5, setup_label="train.lr=0.1", setup_hash="s2")
    rows = compare(job(runs))["rows"]
    assert {(r["dataset"], r["variant"], r["n"]) for r in rows} == {
        ("text/files/char", "baseline", 3), ("text/files/char", "shortcut", 3),
        ("text/files/char", "baseline_matched", 2),
        ("text/files/char [train=smoke]", "baseline", 1), ("text/files/char [train.lr=0.1]", "shortcut", 1)}


def test_settings_shared_by_every_row_go_to_the_heading(tmp_path):
    for s in range(2):
        fake_run(tmp_path / "runs", f"b{s}", "baseline", s, 1.5, label="baseline model.n_layer=2")
        fake_run(tmp_path / "runs", f"s{s}", "shortcut", s, 1.4, label="shortcut model.n_layer=2")
        fake_run(tmp_path / "runs", f"t{s}", "shortcut", s, 1.3, label="shortcut model.n_layer=2 model.taps=[0]")
    rows = compare(job(tmp_path))["rows"]
    assert {r["dataset"] for r in rows} == {"text/files/char {model.n_layer=2}"}
    assert {r["variant"]: r["reference"] for r in rows} == {"baseline": None, "shortcut": "baseline",
                                                             "shortcut model.taps=[0]": "baseline"}
    assert {r["variant"]: r["is_reference"] for r in rows} == {"baseline": True, "shortcut": False,
                                                                "shortcut model.taps=[0]": False}


def ladder(tmp_path, multiplier, seeds=(0, 1, 2)):
    """Baselines of 3 sizes on L(C) = 1 + 0.5 (C/1e13)^-0.3, and a variant whose loss the baseline reaches at
    `multiplier` times the variant's compute."""
    law = lambda c: 1.0 + 0.5 * (c / 1e13) ** -0.3  # noqa: E731
    noise = {0: 0.001, 1: -0.001, 2: 0.0}
    for size, c in (("s", 1e12), ("m", 1e13), ("l", 1e14)):
        for s in seeds:
            fake_run(tmp_path / "runs", f"{size}{s}", "baseline", s, law(c) + noise[s], train_flops=c,
                     label=f"baseline model.n_embd={size}", params={"s": 100, "m": 200, "l": 400}[size])
    for s in seeds:
        fake_run(tmp_path / "runs", f"v{s}", "shortcut", s, law(multiplier * 2e13) + noise[s], train_flops=2e13,
                 label="shortcut model.n_embd=m")


@pytest.mark.parametrize("multiplier", [0.8, 1.25, 2.0])
def test_compute_multiplier_is_recovered(tmp_path, multiplier):
    ladder(tmp_path, multiplier)
    summary = compare(job(tmp_path, "compute_multiplier=true"))
    m = rows_of(summary)["shortcut model.n_embd=m"]["compute_multiplier"]
    assert m["multiplier"] == pytest.approx(multiplier, rel=0.02)
    assert m["ci_low"] <= multiplier * 1.02 and m["ci_high"] >= multiplier / 1.02
    assert (tmp_path / "results" / "compare" / "loss_vs_compute.png").is_file()
    md = (tmp_path / "results" / "compare" / "table.md").read_text()
    assert "compute multiplier" in md and f"×{m['multiplier']:.2f}" in md
    assert rows_of(summary)["baseline model.n_embd=s"]["compute_multiplier"] is None  # the ladder itself


@pytest.mark.parametrize("adaptive", ["model.mod_capacity=0.125", "model.mod_capacity=0.125 model.mod_every=3",
                                      "model.exit_train=0.5"])
def test_an_adaptive_baseline_is_priced_on_the_dense_ladder(tmp_path, adaptive):
    """Issue 21: a routed or exit-trained baseline is no rung of the ladder; it gets a multiplier on the dense one."""
    ladder(tmp_path, 1.25)
    law = lambda c: 1.0 + 0.5 * (c / 1e13) ** -0.3  # noqa: E731
    for s in range(3):  # reaches the dense ladder's loss at 0.8x its own (lower) training compute
        fake_run(tmp_path / "runs", f"a{s}", "baseline", s, law(0.8 * 6e12) + 0.001 * (s - 1), train_flops=6e12,
                 label=f"baseline model.n_embd=m {adaptive}")
    rows = rows_of(compare(job(tmp_path, "compute_multiplier=true")))
    m = rows[f"baseline model.n_embd=m {adaptive}"]["compute_multiplier"]
    assert m["multiplier"] == pytest.approx(0.8, rel=0.03) and len(m["ladder"]) == 3
    assert not any("=0." in rung for rung in m["ladder"])  # dense rungs only
    assert rows["shortcut model.n_embd=m"]["compute_multiplier"]["multiplier"] == pytest.approx(1.25, rel=0.02)  # unchanged


def test_compute_multiplier_needs_a_ladder(runs):
    summary = compare(job(runs, "compute_multiplier=true"))
    assert any("at least 3 sizes" in n for n in summary["notes"])
    assert rows_of(summary)["shortcut"]["compute_multiplier"] is None


@pytest.mark.slow
@pytest.mark.parametrize("order", [("baseline", "shortcut"), ("shortcut", "baseline")])
def test_a_vs_b_in_either_order(runs, order):
    """Issue 19, item 10: `compare shortcut vs baseline` printed "no baseline row" on every row (the first word was
    taken for the baseline's name); the order says nothing now."""
    fake_run(runs / "runs", "other", "baseline", 0, 1.4, label="baseline_matched", model={"match_params": "shortcut"})
    r = subprocess.run([sys.executable, "-m", "shortcut.cli", "compare", order[0], "vs", order[1], "wandb=off",
                        f"results_root={runs / 'results'}"], capture_output=True, text=True, cwd=runs)
    assert r.returncode == 0, r.stderr
    lines = {ln.split(" | ")[0]: ln for ln in r.stdout.splitlines() if ln.startswith("| ")}
    assert {"| baseline", "| shortcut"} <= set(lines) and "baseline_matched" not in r.stdout
    assert "text/files/char" in r.stdout and "no baseline" not in r.stdout and "no Δ" not in r.stdout
    d = stats.ttest_rel(list(SC_TEST.values()), list(BASE_TEST.values()))
    assert "|  | (reference) |" in lines["| baseline"]
    assert f"| baseline | {np.mean(list(SC_TEST.values())) - np.mean(list(BASE_TEST.values())):+.4f} [" in \
        lines["| shortcut"] and f"| {d.pvalue:.3g} |" in lines["| shortcut"]


# Issue 19, item 1, as the reviewer ran it (2 layers, train=smoke, 2 seeds): baselines of width 128 and 32, the
# shortcut at 32 with tap_bias=last; test NLLs of the 32-wide rows as the issue gives them.
WIDE_BASE, NARROW_BASE, NARROW_SC = {0: 3.0421, 1: 3.0469}, {0: 3.5152, 1: 3.5099}, {0: 3.5104, 1: 3.5096}


def widths(tmp_path, narrow_baseline=True, seeds=(0, 1)):
    from shortcut.config import ModelConfig
    from shortcut.train import plain

    specs = [("b128", "baseline model.n_layer=2", dict(arch="baseline"), WIDE_BASE),
             ("sc32", "shortcut model.n_embd=32 model.n_layer=2 model.tap_bias=last",
              dict(arch="shortcut", n_embd=32, tap_bias="last"), NARROW_SC)]
    if narrow_baseline:
        specs.append(("b32", "baseline model.n_embd=32 model.n_layer=2", dict(arch="baseline", n_embd=32), NARROW_BASE))
    for name, label, model, nll in specs:
        for s in seeds:  # the resolved model, every field, as train records it
            fake_run(tmp_path / "runs", f"{name}-{s}", model["arch"], s, nll[s], label=label,
                     model=plain(ModelConfig(n_layer=2, vocab_size=65, **model)))


def test_the_reference_is_the_baseline_of_the_same_size(tmp_path):
    """The shortcut row's Δ was against the width-128 baseline (+0.47, "p = 0.039"): the reference was the baseline
    whose display label had the same extras, else the one with none. It is the width-32 baseline, by identity."""
    widths(tmp_path)
    rows = rows_of(compare(job(tmp_path)))
    sc = rows["shortcut model.n_embd=32 model.tap_bias=last"]
    assert sc["reference"] == "baseline model.n_embd=32" and sc["no_delta"] is None
    expect = stats.ttest_rel(list(NARROW_SC.values()), list(NARROW_BASE.values()))
    assert sc["delta"]["delta"] == pytest.approx(np.mean([NARROW_SC[s] - NARROW_BASE[s] for s in (0, 1)]))
    assert sc["delta"]["p_value"] == pytest.approx(expect.pvalue) and sc["delta"]["test"] == "paired t over 2 seeds"
    assert (sc["delta"]["ci_low"], sc["delta"]["ci_high"]) == pytest.approx(tuple(expect.confidence_interval()))
    assert round(sc["delta"]["delta"], 4) in (-0.0025, -0.0026) and 0.4 < sc["delta"]["p_value"] < 0.5
    assert rows["baseline model.n_embd=32"]["is_reference"] and not rows["baseline"]["is_reference"]
    assert rows["baseline"]["delta"] is None and rows["baseline model.n_embd=32"]["delta"] is None
    md = (tmp_path / "results" / "compare" / "table.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| shortcut"))
    assert f"| baseline model.n_embd=32 | {sc['delta']['delta']:+.4f} [" in line
    assert md.count("(reference)") == 1 and "| baseline model.n_embd=32 |" in next(
        ln for ln in md.splitlines() if "(reference)" in ln)
    with open(tmp_path / "results" / "compare" / "table.csv") as f:
        csv_rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert csv_rows["shortcut model.n_embd=32 model.tap_bias=last"]["reference"] == "baseline model.n_embd=32"
    assert csv_rows["shortcut model.n_embd=32 model.tap_bias=last"]["reference_hash"] == \
        rows["baseline model.n_embd=32"]["settings_hash"]


def test_no_baseline_of_the_same_size_no_delta(tmp_path):
    """Without the width-32 baseline the shortcut row gets no Δ, and says why; never the width-128 one."""
    widths(tmp_path, narrow_baseline=False)
    rows = rows_of(compare(job(tmp_path)))
    sc = rows["shortcut model.n_embd=32 model.tap_bias=last"]
    assert sc["delta"] is None and sc["reference"] is None
    assert sc["no_delta"].startswith("no baseline of the same size: model.n_embd=32 (vs 128)"), sc["no_delta"]
    assert not rows["baseline"]["is_reference"]
    md = (tmp_path / "results" / "compare" / "table.md").read_text()
    assert "no Δ: no baseline of the same size" in md and "(reference)" not in md


def test_a_ladder_references_the_same_size_rung_only(tmp_path):
    """With baselines of several widths each variant is measured against its own width, and only a rung that is
    some row's reference says "(reference)" (every baseline row of a ladder said it)."""
    ladder(tmp_path, 1.25)
    for s in range(3):  # a second variant, at the smallest rung
        fake_run(tmp_path / "runs", f"vs{s}", "shortcut", s, 1.9 + s / 100, train_flops=2e12,
                 label="shortcut model.n_embd=s")
    summary = compare(job(tmp_path, "compute_multiplier=true"))
    rows = rows_of(summary)
    assert rows["shortcut model.n_embd=m"]["reference"] == "baseline model.n_embd=m"
    assert rows["shortcut model.n_embd=s"]["reference"] == "baseline model.n_embd=s"
    assert {v for v, r in rows.items() if r["is_reference"]} == {"baseline model.n_embd=m", "baseline model.n_embd=s"}
    md = (tmp_path / "results" / "compare" / "table.md").read_text()
    marked = [ln.split(" | ")[0] for ln in md.splitlines() if "(reference)" in ln]
    assert marked == ["| baseline model.n_embd=m", "| baseline model.n_embd=s"]
    # the multiplier is priced on the whole ladder whatever the reference
    assert rows["shortcut model.n_embd=s"]["compute_multiplier"] is not None


def test_a_named_reference(tmp_path):
    """compare reference=LABEL (as the table shows it), a model choice, or a settings hash prefix: every other row
    is measured against it, of whatever size the user chose."""
    widths(tmp_path)
    wide = stats.ttest_rel(list(NARROW_SC.values()), list(WIDE_BASE.values()))
    for name in ("baseline", "'baseline model.n_embd=32'"):
        rows = rows_of(compare(job(tmp_path, f"reference={name}")))
        assert rows[name.strip("'")]["is_reference"] and rows[name.strip("'")]["delta"] is None
    sc = rows_of(compare(job(tmp_path, "reference=baseline")))["shortcut model.n_embd=32 model.tap_bias=last"]
    assert sc["reference"] == "baseline" and sc["delta"]["p_value"] == pytest.approx(wide.pvalue)
    md = (tmp_path / "results" / "compare" / "table.md").read_text()
    assert "the row reference=baseline names" in md
    rows = rows_of(compare(job(tmp_path)))
    prefix = rows["baseline model.n_embd=32"]["settings_hash"][:8]
    rows = rows_of(compare(job(tmp_path, f"reference={prefix}")))
    assert rows["baseline"]["reference"] == "baseline model.n_embd=32" and rows["baseline"]["delta"] is not None
    with pytest.raises(UserError, match="reference=nothing names no row.*baseline model.n_embd=32"):
        compare(job(tmp_path, "reference=nothing"))


def test_a_named_model_choice_of_several_rows_is_refused(tmp_path):
    ladder(tmp_path, 1.25)
    for s in range(3):
        fake_run(tmp_path / "runs", f"bm{s}", "baseline", s, 1.2, label="baseline_matched model.n_embd=s")
        fake_run(tmp_path / "runs", f"bn{s}", "baseline", s, 1.2, label="baseline_matched model.n_embd=m")
    with pytest.raises(UserError, match=r"reference=baseline_matched names 2 rows .*name one by its label"):
        compare(job(tmp_path, "reference=baseline_matched"))


def test_a_compute_matched_run_is_measured_against_the_baseline_it_matched(tmp_path):
    """train.match_flops=baseline trains fewer steps of a dearer model for the baseline's FLOPs: its reference is the
    baseline that spent them (within one of its steps); a run merely trained shorter has none, and says so."""
    for s in range(2):
        fake_run(tmp_path / "runs", f"b{s}", "baseline", s, 1.5 + s / 100)  # 30 steps x 10 tokens x 30 = 9000 FLOPs
        fake_run(tmp_path / "runs", f"m{s}", "shortcut", s, 1.4 + s / 100, label="shortcut train.match_flops=baseline",
                 train={"match_flops": "baseline"}, max_steps=22, train_flops_per_token=40)  # 22 x 400 = 8800
        fake_run(tmp_path / "runs", f"short{s}", "shortcut", s, 1.6, label="shortcut train.max_steps=20",
                 max_steps=20)
    rows = rows_of(compare(job(tmp_path)))
    assert rows["shortcut train.match_flops=baseline"]["reference"] == "baseline"
    assert rows["shortcut train.match_flops=baseline"]["delta"]["delta"] == pytest.approx(-0.1)
    assert rows["shortcut train.max_steps=20"]["delta"] is None
    assert rows["shortcut train.max_steps=20"]["no_delta"] == "no baseline trained as long (20 steps; baseline: 30)"


def test_a_selected_row_brings_its_reference(runs):
    """`compare shortcut` shows the shortcut's baseline too: a Δ is never against a row the table leaves out."""
    summary = compare(job(runs, "variants=[shortcut]"))
    assert [r["variant"] for r in summary["rows"]] == ["baseline", "shortcut"]
    assert rows_of(summary)["shortcut"]["reference"] == "baseline"
    assert any("baseline is shown as the reference of shortcut" in n for n in summary["notes"])


def test_arch_fields_are_every_field_a_baseline_ignores():
    """ARCH_KEYS (what a variant and its reference may differ in) is exactly what a baseline GPT never reads: changing
    one of them leaves a baseline's parameters and output unchanged; every other field is compared. A new
    ModelConfig field must be placed on one side or the other here."""
    import dataclasses

    import torch

    from shortcut.compare import ARCH_KEYS
    from shortcut.config import ModelConfig
    from shortcut.model import GPT

    shared = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias", "mlp_hidden",
              "attn_impl", "exit_train", "mod_capacity", "mod_every", "mod_aux_weight", "pos", "norm", "mlp",
              "match_params", "match_by"}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(ARCH_KEYS) | shared == fields and not set(ARCH_KEYS) & shared
    other = dict(taps=[0, 1], feature_map="linear", feature_hidden=7, depth_embedding=False, shortcut_mode="add",
                 tap_bias="last", shortcut_layers=2, dwa_dilation=2, dwa_period=2, attnres_block=2,
                 value_residual_init=0.0, moda_ffn_kv=False, laurel="rw", laurel_rank=2,
                 hc_streams=2, hc_dynamic=False, mhc_sinkhorn_iters=3)
    assert set(other) == set(ARCH_KEYS) - {"arch"}
    base = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    x = torch.randint(0, 11, (2, 8))
    torch.manual_seed(0)
    plain_model = GPT(ModelConfig(**base)).eval()
    torch.manual_seed(0)
    changed = GPT(ModelConfig(**base, **other)).eval()
    assert {k: v.shape for k, v in plain_model.state_dict().items()} == {
        k: v.shape for k, v in changed.state_dict().items()}
    torch.testing.assert_close(plain_model(x)[0], changed(x)[0], rtol=0, atol=0)


@pytest.mark.slow
def test_two_dataset_multirun_with_a_failing_job_then_compare(tmp_path, prepared):
    """text and music train; audio was never prepared, so its job fails; the others finish and compare says so."""
    data = prepared[0].split("=", 1)[1]
    from shortcut.prepare import prepare

    prepare(compose("prepare", [f"data.root={data}", "domain=music", "domain.max_pieces=4"]))
    sweep = tmp_path / "sweep"
    tiny = ["model=baseline,shortcut", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "train.max_steps=5", "wandb=off", f"data.root={data}"]
    r = subprocess.run([sys.executable, "-m", "shortcut.cli", "train", "-m", "domain=text,audio", *tiny,
                        f"hydra.sweep.dir={sweep / 'a'}"], capture_output=True, text=True)
    assert r.returncode == 1 and "2 job(s) failed" in r.stderr and "no prepared corpus" in r.stderr
    # the music corpus was prepared from 4 pieces: a setting of the corpus, which train must name too
    r = subprocess.run([sys.executable, "-m", "shortcut.cli", "train", "-m", "domain=music", *tiny,
                        f"hydra.sweep.dir={sweep / 'b'}"], capture_output=True, text=True)
    assert r.returncode == 1 and "domain.max_pieces=4 (yours None)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "shortcut.cli", "train", "-m", "domain=music", "domain.max_pieces=4",
                        *tiny, f"hydra.sweep.dir={sweep / 'b'}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = compare(compose("compare", [f"runs={sweep}", f"results_root={tmp_path / 'results'}", "wandb=off"]))
    assert {row["dataset"].split("/")[0] for row in summary["rows"]} == {"text", "music"}
    assert sum("failed: no prepared corpus" in i for i in summary["incomplete"]) == 2, summary["incomplete"]
    assert {row["variant"] for row in summary["rows"]} == {"baseline", "shortcut"}


def test_a_run_named_directly_counts_once(runs, tmp_path):
    summary = compare(compose("compare", [f"runs='{tmp_path / 'runs' / 'b0'},{tmp_path / 'runs'}/b*'",
                                          f"results_root={tmp_path / 'results'}", "wandb=off"]))
    assert [(r["variant"], r["n"]) for r in summary["rows"]] == [("baseline", 3)]


def test_the_ladder_holds_only_sizes_of_the_reference(tmp_path):
    """An ablation of the baseline (here: dropout) is not a rung of the size ladder."""
    ladder(tmp_path, 1.25)
    for s in range(3):
        fake_run(tmp_path / "runs", f"drop{s}", "baseline", s, 0.5, train_flops=1e13,
                 label="baseline model.n_embd=m model.dropout=0.3", model={"dropout": 0.3})
    summary = compare(job(tmp_path, "compute_multiplier=true"))
    rows = rows_of(summary)
    assert rows["shortcut model.n_embd=m"]["compute_multiplier"]["multiplier"] == pytest.approx(1.25, rel=0.02)
    assert "baseline model.n_embd=m model.dropout=0.3" not in rows["shortcut model.n_embd=m"]["compute_multiplier"][
        "ladder"]
    assert not rows["baseline model.n_embd=m model.dropout=0.3"]["in_ladder"]


def test_damaged_records_are_one_line_refusals(runs, tmp_path):
    path = tmp_path / "runs" / "b1" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "seed": "zero"}))
    with pytest.raises(UserError, match=r"b1/summary.json holds values of the wrong type \(seed='zero'"):
        compare(job(runs))


def test_compare_output_is_not_a_run_and_old_pictures_go(runs, tmp_path):
    inside = compose("compare", [f"runs={tmp_path / 'runs'}", f"results_root={tmp_path / 'runs' / 'results'}",
                                 "wandb=off"])
    compare(inside)
    (tmp_path / "runs" / "results" / "compare" / "curves_7.png").write_bytes(b"old")
    summary = compare(inside)  # its own summary.json under runs/ is not taken for a run
    assert {r["variant"] for r in summary["rows"]} == {"baseline", "shortcut"}
    assert not (tmp_path / "runs" / "results" / "compare" / "curves_7.png").exists()


def test_a_validation_evaluation_is_labelled_as_one(tmp_path):
    for s in range(2):
        fake_run(tmp_path / "runs", f"b{s}", "baseline", s, 1.5 + s / 100, split="val")
        fake_run(tmp_path / "runs", f"s{s}", "shortcut", s, 1.4 + s / 100, split="val")
    compare(job(tmp_path))
    md = (tmp_path / "results" / "compare" / "table.md").read_text()
    assert "| val NLL | val NLL |" in md and "Val NLL: sliding window" in md and "test NLL" not in md


def test_identity_keeps_each_setting_whole():
    """A run's variant settings are recorded one by one, so compare never splits its label: a value with a space in
    it stays one setting (issue 20)."""
    from shortcut.rundir import identify

    ident = identify(model={"arch": "shortcut", "taps": [0, 2], "note": "two words"},
                     resolved_model={"arch": "shortcut", "taps": [0, 2], "note": "two words"},
                     train={"max_steps": 20}, effective={"max_steps": 20},
                     reference={"model": {"arch": "shortcut", "taps": None, "note": ""}, "train": {"max_steps": 10}},
                     choices={"model": "shortcut"})
    assert ident.variant_settings == ["model.note=two words", "model.taps=[0,2]", "train.max_steps=20"]
    assert ident.variant_label == "shortcut model.note=two words model.taps=[0,2] train.max_steps=20"


def test_summaries_from_before_variant_settings_are_read(runs, tmp_path):
    """A summary.json without identity.variant_settings (written before issue 20) gives the same table: its
    settings are taken from its label."""
    for s in range(3):
        fake_run(tmp_path / "runs", f"t{s}", "shortcut", s, 1.4, label="shortcut model.taps=[0]")
    new = compare(job(runs))["rows"]
    for path in (tmp_path / "runs").glob("*/summary.json"):
        record = json.loads(path.read_text())
        assert record["identity"].pop("variant_settings") is not None
        path.write_text(json.dumps(record))
    old = compare(job(runs))["rows"]
    assert old == new and {r["variant"] for r in old} == {"baseline", "shortcut", "shortcut model.taps=[0]"}


def _with_adaptive(d, speedups, nll_exit, routed=None):
    record = json.loads((d / "eval.json").read_text())
    plain = {"tokens_per_s": 100.0, "speedup": 1.0, "flops_per_token": 10.0, "mean_exit_depth": None,
             "acceptance": None}
    record["decode"] = {"tokens": 32, "prompt_tokens": 8, "threshold": 0.5, "draft_depth": 1, "draft_tokens": 4,
                        "device": "cpu", "settings": {}, "plain": plain,
                        "exit": {**plain, "tokens_per_s": 100.0 * speedups[0], "speedup": speedups[0],
                                 "flops_per_token": 6.0, "mean_exit_depth": 1.5, "nll": nll_exit,
                                 "full_nll": nll_exit - 0.25},
                        "speculative": {**plain, "tokens_per_s": 100.0 * speedups[1], "speedup": speedups[1],
                                        "acceptance": 0.75, "same_output": True}}
    if routed is not None:
        record["routing"] = {"train_mode_nll": routed, "capacity": 0.125, "routed_blocks": [1],
                             "causal_share": [0.2], "causal_flops_per_token": 7.0}
    (d / "eval.json").write_text(json.dumps(record))


def test_decoding_and_routing_figures_get_their_own_table_and_picture(runs):
    """Issue 21: compare shows eval.decode_tokens' speeds (mean [min-max] over seeds), the exit policy's NLL
    and a routed model's training-rule NLL, read from eval.json, and draws NLL against decode cost."""
    for s in range(3):
        _with_adaptive(runs / "runs" / f"b{s}", (0.5 + s / 10, 1.5 + s / 10), 2.0 + s / 10, routed=1.0 + s / 10)
    summary = compare(job(runs))
    a = rows_of(summary)["baseline"]["adaptive"]
    assert a["exit"]["speedup"] == pytest.approx(0.6) and a["exit"]["speedup_range"] == pytest.approx([0.5, 0.7])
    assert a["exit"]["nll_increase"] == pytest.approx(0.25) and a["exit"]["flops_ratio"] == pytest.approx(0.6)
    assert a["speculative"]["speedup"] == pytest.approx(1.6) and a["speculative"]["same_output"] is True
    assert a["train_mode_nll"][0] == pytest.approx(1.1) and a["causal_flops_per_token"] == 7.0
    assert rows_of(summary)["shortcut"]["adaptive"] is None  # measured nothing: no figures, no row
    table = next((runs / "results").glob("**/table.md")).read_text()
    assert "adaptive compute" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("| baseline") and "x0.60 [0.50–0.70]" in ln)
    assert "x1.60 [1.50–1.70], 0.75, yes" in line and "1.1000, 7" in line
    assert any(Path(p).name.startswith("adaptive_") and Path(p).is_file() for p in summary["pictures"])


def test_a_figure_some_seeds_lack_is_left_out(runs):
    _with_adaptive(runs / "runs" / "b0", (0.5, 1.5), 2.0)
    assert "decode_tokens" not in (rows_of(compare(job(runs)))["baseline"]["adaptive"] or {})
