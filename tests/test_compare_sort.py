"""compare sort=multiplier: each dataset's rows by compute multiplier, best first, then the ladder by compute."""

import pytest

from test_compare import fake_run, job, rows_of
from shortcut.compare import compare


def test_rows_sorted_by_compute_multiplier(tmp_path):
    """A ladder whose middle rung is the plain baseline (as in experiment=shortcut_search_cpu) and two variants
    worth x0.8 and x2 of their compute."""
    law = lambda c: 1.0 + 0.5 * (c / 1e13) ** -0.3  # noqa: E731
    for size, c in (("baseline model.n_embd=32", 1e12), ("baseline", 1e13), ("baseline model.n_embd=128", 1e14)):
        for s in range(3):
            fake_run(tmp_path / "runs", f"{c:.0e}-{s}", "baseline", s, law(c) + 0.001 * (s - 1), train_flops=c,
                     label=size)
    for label, mult in (("shortcut", 0.8), ("shortcut model.shortcut_mode=add", 2.0)):
        for s in range(3):
            fake_run(tmp_path / "runs", f"{label[-3:]}{s}", "shortcut", s, law(mult * 2e13) + 0.001 * ((2 * s) % 3 - 1),
                     train_flops=2e13, label=label)
    summary = compare(job(tmp_path, "compute_multiplier=true", "sort=multiplier"))
    order = [r["variant"] for r in summary["rows"]]
    assert order == ["shortcut model.shortcut_mode=add", "shortcut", "baseline model.n_embd=32", "baseline",
                     "baseline model.n_embd=128"]
    assert rows_of(summary)[order[0]]["compute_multiplier"]["multiplier"] == pytest.approx(2.0, rel=0.02)
    md = (tmp_path / "results" / "compare" / "table.md").read_text()
    assert md.index("\n| shortcut model.shortcut_mode=add |") < md.index("\n| shortcut |") < md.index("\n| baseline |")
    default = compare(job(tmp_path, "compute_multiplier=true"))  # by variant name, the baseline first
    assert [r["variant"] for r in default["rows"]][0] == "baseline"


def test_the_variant_to_believe_is_chosen_on_validation_not_test(tmp_path):
    """Of two variants, the one with the better test NLL has the worse validation NLL: the note names the other."""
    law = lambda c: 1.0 + 0.5 * (c / 1e13) ** -0.3  # noqa: E731
    for size, c in (("baseline model.n_embd=32", 1e12), ("baseline", 1e13), ("baseline model.n_embd=128", 1e14)):
        for s in range(3):
            fake_run(tmp_path / "runs", f"{c:.0e}-{s}", "baseline", s, law(c) + 0.001 * (s - 1), train_flops=c,
                     label=size)
    for label, test, val in (("shortcut", 1.10, 1.20), ("shortcut model.tap_bias=last", 1.05, 1.30)):
        for s in range(3):
            fake_run(tmp_path / "runs", f"{label[-4:]}{s}", "shortcut", s, test + 0.001 * s, train_flops=2e13,
                     label=label, val_curve=(3.0, val + 0.001 * s))
    summary = compare(job(tmp_path, "compute_multiplier=true"))
    chosen = [n for n in summary["notes"] if "chosen on validation" in n]
    assert len(chosen) == 1 and "among 2 variants: shortcut (val 1.2010" in chosen[0], chosen


def test_sorting_by_multiplier_needs_the_multipliers(tmp_path):
    with pytest.raises(ValueError, match="compute_multiplier=true"):
        job(tmp_path, "sort=multiplier")


def test_without_a_ladder_the_baseline_is_never_the_chosen_variant(tmp_path):
    """One baseline size: no multipliers, no ladder; the note still only considers the variants tried."""
    for s in range(3):
        fake_run(tmp_path / "runs", f"b{s}", "baseline", s, 1.0, val_curve=(3.0, 0.9))
        for label, val in (("shortcut", 1.2), ("shortcut model.tap_bias=last", 1.1)):
            fake_run(tmp_path / "runs", f"{label[-4:]}{s}", "shortcut", s, 1.0, label=label, val_curve=(3.0, val))
    notes = compare(job(tmp_path, "compute_multiplier=true"))["notes"]
    chosen = [n for n in notes if "chosen on validation" in n]
    assert len(chosen) == 1 and "among 2 variants: shortcut model.tap_bias=last" in chosen[0], chosen
