"""compare on run directories the tests write with known numbers: statistics against scipy, equal-compute
interpolation, refusals, and the `baseline vs shortcut` form."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from shortcut.cli import compose
from shortcut.compare import compare, delta, find_runs
from shortcut.config import UserError

BASE_TEST = {0: 1.50, 1: 1.53, 2: 1.49}
SC_TEST = {0: 1.45, 1: 1.50, 2: 1.46}


def fake_run(root, name, arch, seed, test_nll, data_hash="abc", domain="text", flops_per_step=100.0,
             val_curve=(3.0, 2.0, 1.6), overrides=(), finished=True):
    d = root / name
    d.mkdir(parents=True)
    summary = {"domain": domain, "source": "files", "tokenizer": "char", "arch": arch, "model_choice": arch,
               "overrides": list(overrides) + [f"seed={seed}"], "seed": seed, "params": 1000 if arch == "baseline" else 1100,
               "non_embedding_params": 900, "flops_per_token": 10.0, "data_hash": data_hash,
               "final_val_loss": val_curve[-1], "finished": finished, "step": 30, "max_steps": 30}
    (d / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": 10 * (i + 1), "train_flops": flops_per_step * 10 * (i + 1), "val_loss": v, "tokens_per_s": 500.0}
            for i, v in enumerate(val_curve)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.json").write_text(json.dumps({"test_nll": test_nll, "bits_per_char": test_nll / np.log(2)}))
    return d


@pytest.fixture
def runs(tmp_path):
    for s in range(3):
        fake_run(tmp_path / "runs", f"b{s}", "baseline", s, BASE_TEST[s], val_curve=(3.0, 2.0, 1.6 + s / 100))
        fake_run(tmp_path / "runs", f"s{s}", "shortcut", s, SC_TEST[s], flops_per_step=200.0,
                 val_curve=(2.9, 1.9, 1.5 + s / 100))
    return tmp_path


def job(tmp_path, *overrides):
    return compose("compare", [f"runs={tmp_path / 'runs'}", f"results_root={tmp_path / 'results'}", *overrides])


def test_table_statistics_match_scipy(runs):
    summary = compare(job(runs))
    rows = {r["variant"]: r for r in summary["rows"]}
    b, s = rows["baseline"], rows["shortcut"]
    assert b["test_nll"][0] == pytest.approx(np.mean(list(BASE_TEST.values())))
    assert b["test_nll"][1] == pytest.approx(np.std(list(BASE_TEST.values()), ddof=1))
    d = s["delta"]
    ref = stats.ttest_rel(list(SC_TEST.values()), list(BASE_TEST.values()))
    assert d["test"].startswith("paired") and d["p_value"] == pytest.approx(ref.pvalue)
    diffs = np.array(list(SC_TEST.values())) - np.array(list(BASE_TEST.values()))
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert s["unit"] == "bits_per_char" and b["delta"] is None
    for f in ("table.md", "table.csv", "summary.json"):
        assert (runs / "results" / "compare" / f).is_file()
    assert any("curves" in p for p in summary["pictures"])
    md = (runs / "results" / "compare" / "table.md").read_text()
    assert "paired t over 3 seeds" in md and "(reference)" in md


def test_unpaired_rows_use_welch():
    base, other = {0: 1.0, 1: 1.2, 2: 1.1}, {3: 0.9, 4: 1.0}
    d = delta(base, other)
    ref = stats.ttest_ind(list(other.values()), list(base.values()), equal_var=False)
    assert d["test"].startswith("Welch") and d["p_value"] == pytest.approx(ref.pvalue)
    assert delta({0: 1.0}, {0: 0.9})["ci_low"] is None  # one seed: no interval, and the table says so


def test_equal_compute_interpolation(runs):
    summary = compare(job(runs))
    rows = {r["variant"]: r for r in summary["rows"]}
    # the baseline reaches 3000 FLOPs, the shortcut 6000: compare both at 3000, where the shortcut is at step 15
    assert rows["baseline"]["budget_flops"] == 3000
    assert rows["baseline"]["val_at_budget"][0] == pytest.approx(np.mean([1.60, 1.61, 1.62]))
    assert rows["shortcut"]["val_at_budget"][0] == pytest.approx((2.9 + 1.9) / 2)


def test_refuses_mixed_data_and_empty_selection(runs, tmp_path):
    fake_run(tmp_path / "runs", "odd", "baseline", 7, 1.5, data_hash="other")
    with pytest.raises(UserError, match="different corpora"):
        compare(job(runs))
    with pytest.raises(UserError, match="no finished runs"):
        compare(compose("compare", [f"runs={tmp_path / 'nothing'}/**"]))


def test_missing_and_unfinished_runs_are_reported(runs, tmp_path):
    (tmp_path / "runs" / "crashed" / "ckpt").mkdir(parents=True)
    fake_run(tmp_path / "runs", "half", "shortcut", 3, 1.4, finished=False)
    _, incomplete = find_runs(str(tmp_path / "runs"))
    assert any("crashed" in i for i in incomplete) and any("half" in i for i in incomplete)
    summary = compare(job(runs))
    assert any("different seeds" in n for n in summary["notes"])
    assert next(r for r in summary["rows"] if r["variant"] == "shortcut")["delta"]["test"].startswith("Welch")


def test_variants_get_their_own_rows(runs, tmp_path):
    for s in range(2):
        fake_run(tmp_path / "runs", f"m{s}", "baseline", s, 1.47, overrides=["model.match_params=shortcut"])
    rows = {r["variant"] for r in compare(job(runs))["rows"]}
    assert rows == {"baseline", "shortcut", "baseline model.match_params=shortcut"}


def test_training_setups_are_not_pooled(runs, tmp_path):
    fake_run(tmp_path / "runs", "smoke0", "baseline", 0, 2.5, overrides=["train=smoke"])
    summary_path = tmp_path / "runs" / "smoke0" / "summary.json"
    s = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**s, "train_choice": "smoke"}))
    fake_run(tmp_path / "runs", "lr", "shortcut", 0, 2.5, overrides=["train.lr=0.1", "train.log_every=5"])
    rows = compare(job(runs))["rows"]
    assert {(r["dataset"], r["variant"], r["n"]) for r in rows} == {
        ("text/files/char", "baseline", 3), ("text/files/char", "shortcut", 3),
        ("text/files/char [train=smoke]", "baseline", 1), ("text/files/char [train.lr=0.1]", "shortcut", 1)}


def test_baseline_vs_shortcut_as_written(runs):
    fake_run(runs / "runs", "other", "baseline_matched", 0, 1.4)
    r = subprocess.run([sys.executable, "-m", "shortcut.cli", "compare", "baseline", "vs", "shortcut",
                        f"results_root={runs / 'results'}"], capture_output=True, text=True, cwd=runs)
    assert r.returncode == 0, r.stderr
    assert "| baseline |" in r.stdout and "| shortcut |" in r.stdout and "baseline_matched" not in r.stdout
    assert "text/files/char" in r.stdout


def test_two_dataset_multirun_with_a_failing_job_then_compare(tmp_path, prepared):
    """text and music train; audio was never prepared, so its job fails; the others finish and compare says so."""
    data = prepared[0].split("=", 1)[1]
    from shortcut.prepare import prepare

    prepare(compose("prepare", [f"data.root={data}", "domain=music", "domain.max_pieces=4"]))
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "shortcut.cli", "train", "-m", f"data.root={data}",
                        "domain=text,music,audio", "model=baseline,shortcut", "model.n_layer=2", "model.n_head=2",
                        "model.n_embd=32", "model.block_size=32", "train.max_steps=5", "wandb=off",
                        f"hydra.sweep.dir={sweep}"], capture_output=True, text=True)
    assert r.returncode == 1 and "2 job(s) failed" in r.stderr and "no prepared corpus" in r.stderr
    summary = compare(compose("compare", [f"runs={sweep}", f"results_root={tmp_path / 'results'}"]))
    assert {row["dataset"].split("/")[0] for row in summary["rows"]} == {"text", "music"}
    assert sum("failed: no prepared corpus" in i for i in summary["incomplete"]) == 2
