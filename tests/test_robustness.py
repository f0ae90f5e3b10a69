"""Robustness (issue 23): noisy context (seeded, paired across models, targets clean, p = 0 is in-domain exactly),
shifted sources tokenized with the run's own tokenizer (unknown symbols counted, incompatible runs refused), the
depth-profile shift with paired bootstrap intervals, unsafe exits against a hand computation, compare's table."""

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, english_like
from shortcut import corpus
from shortcut.cli import _lists_as_override, compose
from shortcut.config import EvalConfig, ModelConfig, UserError
from shortcut.data import TokenData
from shortcut.evaluate import evaluate, needs_eval
from shortcut.model import GPT
from shortcut.prepare import prepare
from shortcut.robustness import ECE_BINS, Condition, corrupt, measure
from shortcut.train import train

STEPS = ["train.lr=3e-3", "train.warmup_steps=10"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only waits for the first (7x slower on the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A char corpus of English-like text, a shortcut run (100 steps) and an exit-trained baseline (40 steps)."""
    tmp = tmp_path_factory.mktemp("robust")
    (tmp / "texts").mkdir()
    for i in range(3):
        (tmp / "texts" / f"part{i}.txt").write_text(english_like(4000, seed=i), encoding="utf-8")
    base = [f"data.root={tmp / 'data'}", "domain=text", "domain.source=files"]
    prepare(compose("prepare", base + [f"domain.files={tmp}/texts/*.txt"]))
    train(compose("train", base + TINY + ["model=shortcut", "train.max_steps=100", *STEPS]), tmp / "shortcut")
    train(compose("train", base + TINY + ["model.exit_train=0.5", "train.max_steps=40", *STEPS]), tmp / "baseline")
    return tmp


def conditions_of(run, *overrides):
    return evaluate(compose("eval", [f"run_dir={run}", "eval.audit=false", *overrides]))["conditions"]


# --- noise ---

def test_corruption_is_seeded_nested_prefix_stable_and_always_another_token():
    tokens = np.random.default_rng(5).integers(0, 40, 5000)
    a = corrupt(tokens, 0.2, 0, 40)
    assert np.array_equal(a, corrupt(tokens, 0.2, 0, 40)) and not np.array_equal(a, corrupt(tokens, 0.2, 1, 40))
    assert np.array_equal(corrupt(tokens[:700], 0.2, 0, 40), a[:700])  # token j's fate: (seed, j) alone
    assert abs((a != tokens).mean() - 0.2) < 0.02
    wider = corrupt(tokens, 0.5, 0, 40)
    changed = a != tokens
    assert np.array_equal(wider[changed], a[changed])  # nested in p: the same tokens, replaced by the same ids
    everything = corrupt(tokens, 1.0, 0, 40)
    assert (everything != tokens).all() and everything.max() < 40 and everything.min() >= 0
    assert np.array_equal(corrupt(tokens, 0.0, 0, 40), tokens)


def test_noise_at_p0_is_the_in_domain_nll_exactly_and_nll_rises_with_p(runs):
    result = evaluate(compose("eval", [f"run_dir={runs / 'shortcut'}", "eval.audit=false",
                                       "eval.noise=[0,0.1,0.5]"]))
    c = {x["name"]: x for x in result["conditions"]}
    assert c["in-domain"]["nll"] == result["test_nll"]  # the eval's own number, not an approximation
    assert c["noise p=0"]["nll"] == c["in-domain"]["nll"] and c["noise p=0"]["delta_nll"] == 0
    assert c["noise p=0"]["n_tokens"] == result["n_tokens"]
    assert 0 < c["noise p=0.1"]["delta_nll"] < c["noise p=0.5"]["delta_nll"]
    assert c["noise p=0"]["delta_nll_interval"] == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert 0 < c["noise p=0.5"]["delta_nll_interval"]["ci_low"] < c["noise p=0.5"]["delta_nll"]
    assert c["noise p=0.1"]["changed"] == pytest.approx(0.1, abs=0.02)
    # the same windows read two ways: the paired bootstrap of p = 0 against in-domain is exactly zero
    shift = c["noise p=0"]["depth"]["shift"]
    assert shift["paired"] and shift["shallow_mass"] == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    lo, hi = c["noise p=0.5"]["depth"]["shift"]["shallow_mass"]["ci_low"], \
        c["noise p=0.5"]["depth"]["shift"]["shallow_mass"]["ci_high"]
    assert lo <= c["noise p=0.5"]["depth"]["shift"]["shallow_mass"]["delta"] <= hi and lo < hi
    assert c["in-domain"]["depth"]["shift"] is None
    assert sum(c["in-domain"]["depth"]["profile"]) == pytest.approx(1)


def test_the_same_corruption_for_every_model_and_every_run(runs):
    few = "eval.max_tokens=600"
    a = conditions_of(runs / "shortcut", "eval.noise=[0.2]", few)
    b = conditions_of(runs / "baseline", "eval.noise=[0.2]", few)
    again = conditions_of(runs / "shortcut", "eval.noise=[0.2]", "eval.batch_size=3", few)
    assert a[1]["inputs_hash"] == b[1]["inputs_hash"] == again[1]["inputs_hash"]
    assert a[0]["inputs_hash"] != a[1]["inputs_hash"]
    assert conditions_of(runs / "shortcut", "eval.noise=[0.2]", "eval.noise_seed=1", few)[1]["inputs_hash"] \
        != a[1]["inputs_hash"]


def test_targets_are_never_corrupted(runs):
    data = TokenData(next((runs / "data" / "text").glob("files-*")), 32)
    cond = Condition("noise p=1", "noise", data, "test", data.vocab_size, p=1.0, seed=0)
    inputs, targets, scored = cond.arrays(500)
    clean = np.asarray(data.splits["test"][:500], dtype=np.int64)
    assert np.array_equal(targets, clean) and scored is None
    assert (inputs != clean).all()  # p = 1: every context token replaced


def test_noise_levels_are_one_list_on_the_command_line():
    assert _lists_as_override(["run_dir=r", "eval.noise=0.05,0.2"]) == ["run_dir=r", "eval.noise=[0.05,0.2]"]
    assert _lists_as_override(["eval.noise=[0.1]"]) == ["eval.noise=[0.1]"]
    assert compose("eval", ["run_dir=r", *_lists_as_override(["eval.noise=0.05,0.2"])]).eval.noise == [0.05, 0.2]
    with pytest.raises(ValueError, match="eval.noise"):
        EvalConfig(noise=[1.5])


def test_conditions_are_reevaluated_only_when_their_settings_change(runs):
    run = runs / "baseline"
    cfg = compose("eval", [f"run_dir={run}", "eval.audit=false", "eval.noise=[0.2]"])
    evaluate(cfg)
    assert needs_eval(run, cfg.eval) is None
    assert "robustness" in needs_eval(run, compose("eval", [f"run_dir={run}", "eval.audit=false",
                                                            "eval.noise=[0.3]"]).eval)


# --- unsafe exits, by hand ---

def test_unsafe_exits_and_calibration_match_a_hand_computation(tmp_path):
    """A 2-layer baseline (exits at depth 1 and the full depth 2): a token exits early when head(h_1)'s top
    probability reaches the threshold; it is unsafe when that top-1 differs from the full model's. Under CALM's
    copy-up nothing the full depth reads changes (block 1 reads h_1 of every token), so by hand it is plain
    arithmetic on two forward passes."""
    V, T = 23, 16
    rng = np.random.default_rng(0)
    splits = {s: rng.integers(0, V, n) for s, n in (("train", 400), ("val", 100), ("test", 161))}
    corpus.write_corpus(tmp_path / "c", splits, {"vocab_size": V, "tokenizer": "char", "domain": "text"})
    data = TokenData(tmp_path / "c", T)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=V)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    test = torch.from_numpy(np.asarray(data.splits["test"], dtype=np.int64))
    x, y = test[:160].view(10, T), test[1:161].view(10, T)  # stride T: ten windows, every target scored once
    with torch.no_grad():
        full = model(x)[0]
        shallow = model.head(model.hidden_states(x)[1])  # the exit at depth 1: the head on h_1
    conf1, top1 = shallow.softmax(-1).max(-1)
    c = conf1.flatten().sort().values
    gaps = (c[1:] - c[:-1])[60:100]
    k = 60 + int(gaps.argmax())
    threshold = float((c[k] + c[k + 1]) / 2)  # about half exit early, and no confidence sits near the threshold
    early = conf1 >= threshold
    unsafe = early & (top1 != full.argmax(-1))
    nll_full = F.cross_entropy(full.transpose(1, 2), y, reduction="none")
    nll_1 = F.cross_entropy(shallow.transpose(1, 2), y, reduction="none")
    conf = torch.where(early, conf1, full.softmax(-1).max(-1).values)
    hit = torch.where(early, top1, full.argmax(-1)) == y
    bins = [[0, 0.0, 0.0] for _ in range(ECE_BINS)]
    for cf, h in zip(conf.flatten().tolist(), hit.flatten().tolist()):
        b = min(int(cf * ECE_BINS), ECE_BINS - 1)
        bins[b][0], bins[b][1], bins[b][2] = bins[b][0] + 1, bins[b][1] + cf, bins[b][2] + h
    hand_ece = sum(abs(h - cf) for _, cf, h in bins) / 160

    cfg = EvalConfig(exit="confidence", exit_thresholds=[threshold], batch_size=4)
    record, _ = measure(model, Condition("in-domain", "in_domain", data, "test", V), cfg, T, nullcontext())
    e = record["exits"]["thresholds"][0]
    assert record["n_tokens"] == 160 and 0 < int(unsafe.sum()) < int(early.sum()) < 160
    assert e["n_early"] == int(early.sum()) and e["n_unsafe"] == int(unsafe.sum())
    assert e["early_share"] == pytest.approx(float(early.float().mean()))
    assert e["unsafe_share"] == pytest.approx(float(unsafe.sum() / early.sum()))
    assert e["nll_increase_unsafe"] == pytest.approx(float((nll_1 - nll_full)[unsafe].mean()), rel=1e-5)
    assert e["nll_increase_early"] == pytest.approx(float((nll_1 - nll_full)[early].mean()), rel=1e-5)
    assert e["ece"] == pytest.approx(hand_ece, rel=1e-5)
    assert record["nll"] == pytest.approx(float(nll_full.mean()), rel=1e-6)


# --- shifted sources ---

@pytest.fixture(scope="module")
def other_text(runs):
    """Another English-like text with characters the run's vocabulary lacks."""
    folder = runs / "other"
    folder.mkdir(exist_ok=True)
    text = english_like(3000, seed=9).replace("the", "thé").replace("of", "øf") + "Fin: 5 € for the ß.\n"
    (folder / "o.txt").write_text(text, encoding="utf-8")
    return folder


def test_a_shifted_text_is_tokenized_with_the_runs_vocabulary_and_its_unknowns_counted(runs, other_text):
    spec = f"eval.shift='files={other_text}/*.txt'"
    c = conditions_of(runs / "shortcut", spec)[1]
    assert c["kind"] == "shift" and c["shift"] == f"files={other_text}/*.txt"
    shifted = TokenData(c["corpus"], 32)
    run_meta = corpus.read_meta(next((runs / "data" / "text").glob("files-*")))
    V = run_meta["vocab_size"]
    assert shifted.meta["vocab"] == run_meta["vocab"] and shifted.meta["reserved_id"] == V
    assert "/shifted/" in c["corpus"]  # never the run's own corpus' folder, which files do not key
    ids = np.asarray(shifted.splits["test"])
    text = (other_text / "o.txt").read_text(encoding="utf-8")[-len(ids):]  # test is the end of the text
    assert "".join(run_meta["vocab"][i] if i < V else "?" for i in ids) == "".join(
        ch if ch in run_meta["vocab"] else "?" for ch in text)
    u = c["unknown"]
    assert u["n"] == int((ids == V).sum()) > 0 and u["rate"] == pytest.approx(u["n"] / len(ids))
    assert u["unscored_targets"] == int((ids[1:c["n_tokens"] + u["n"] + 1] == V).sum())
    assert {ch for ch, _ in u["examples"]} == {"é", "ø", "€", "ß", ":", "5"} and "not scored" in u["policy"]
    assert np.isfinite(c["nll"]) and c["n_tokens"] + u["unscored_targets"] == len(ids) - 1
    assert c["depth"]["shift"]["paired"] is False
    meta_file = other_text.parent / c["corpus"] / "meta.json"
    before = meta_file.stat().st_mtime_ns
    assert conditions_of(runs / "shortcut", spec)[1]["data_hash"] == c["data_hash"]
    assert meta_file.stat().st_mtime_ns == before  # prepared once, then reused


@pytest.mark.parametrize("spec,match", [
    ("tokenizer=byte", "tokenized with the run's own tokenizer"),
    ("name=music", "stays in the run's domain"),
    ("collection=essenFolksong", "may set source, files"),
    ("nonsense=1", "has no setting nonsense"),
    ("justaword", "is not key=value"),
])
def test_a_shift_that_changes_the_tokens_or_the_domain_is_refused_in_one_line(runs, spec, match):
    with pytest.raises(UserError, match=match) as exc:
        conditions_of(runs / "baseline", f"eval.shift='{spec}'")
    assert "\n" not in str(exc.value)


def test_the_runs_own_corpus_is_no_shift(runs):
    with pytest.raises(UserError, match="describes the run's own corpus"):
        conditions_of(runs / "baseline", f"eval.shift='files={runs}/texts/*.txt'")


def test_a_prepared_corpus_of_other_ids_is_refused(runs, other_text, tmp_path):
    root = tmp_path / "data"
    chars = prepare(compose("prepare", [f"data.root={root}", "domain=text", "domain.source=files",
                                        f"domain.files={other_text}/*.txt"]))  # its own vocabulary
    with pytest.raises(UserError, match="another char tokenizer than this run's"):
        conditions_of(runs / "baseline", f"eval.shift={chars}")
    base = [f"data.root={root}", "domain=text", "domain.source=files", "domain.tokenizer=byte"]
    prepare(compose("prepare", base + [f"domain.files={runs}/texts/*.txt"]))
    train(compose("train", base + TINY + ["train.max_steps=2"]), tmp_path / "byte")
    with pytest.raises(UserError, match="holds char tokens; this run's model reads byte tokens") as exc:
        conditions_of(tmp_path / "byte", f"eval.shift={chars}")
    assert "\n" not in str(exc.value)
    c = conditions_of(tmp_path / "byte", f"eval.shift='files={other_text}/*.txt'")[1]  # bytes know every text
    assert c["unknown"]["n"] == 0 and c["n_tokens"] > 0


@pytest.mark.slow
def test_a_shifted_music_source_uses_the_runs_tokenizer_and_counts_notes_it_cannot_hold(tmp_path):
    from symusic import Note, Score, TimeSignature, Track

    from test_music import write_piece

    for name, n in (("a", 6), ("b", 4)):
        (tmp_path / name).mkdir()
        for i in range(n):
            write_piece(tmp_path / name / f"{name}{i}.mid", seed=i + 10 * (name == "b"))
    score = Score(480)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    track = Track(name="high", program=0)
    track.notes.extend(Note(480 * k, 480, 100 + k % 8, 80) for k in range(32))  # above pitch_range [36, 90)
    score.tracks.append(track)
    score.dump_midi(str(tmp_path / "b" / "high.mid"))
    base = [f"data.root={tmp_path / 'data'}", "domain=music", "domain.source=files"]
    prepare(compose("prepare", base + [f"domain.files={tmp_path / 'a'}"]))
    train(compose("train", base + TINY + ["train.max_steps=2"]), tmp_path / "run")
    c = conditions_of(tmp_path / "run", f"eval.shift='files={tmp_path / 'b'}'")[1]
    run_corpus = next((tmp_path / "data" / "music").glob("files-*"))
    assert (run_corpus / "tokenizer.json").read_bytes() == (tmp_path / c["corpus"] / "tokenizer.json").read_bytes()
    meta = corpus.read_meta(c["corpus"])
    outside = sum(meta["notes_outside_range"].values())
    assert outside == 32 and "pitch range" in c["unknown"]["what"]
    assert c["unknown"]["n"] == meta["notes_outside_range"]["test"]


def test_a_shifted_audio_source_is_quantised_with_the_runs_codebook(tmp_path):
    import soundfile as sf

    from shortcut.prepare.shift import prepare_shift
    from test_audio import sound

    for name, kinds in (("a", ["tone", "chirp", "noise"]), ("b", ["chirp", "silence", "tone"])):
        (tmp_path / name).mkdir()
        for i in range(6):
            sf.write(tmp_path / name / f"{name}{i}.wav", sound(kinds[i % 3], 0.5, 16000, seed=i), 16000)
    args = [f"data.root={tmp_path / 'data'}", "domain=audio", "domain.source=files", "domain.codebook_size=8",
            "prepare.workers=1"]
    run_corpus = prepare(compose("prepare", args + [f"domain.files={tmp_path / 'a'}"]))
    domain = {**corpus.read_meta(run_corpus)["settings"], "files": str(tmp_path / "a")}
    shift = prepare_shift(f"files={tmp_path / 'b'}", domain, corpus.read_meta(run_corpus), run_corpus,
                          tmp_path / "data")
    assert (shift.path / "codebook.npy").read_bytes() == (run_corpus / "codebook.npy").read_bytes()
    assert shift.meta["files"]["train"] + shift.meta["files"]["val"] + shift.meta["files"]["test"] == 6
    assert shift.unknown("test")["n"] == 0
    with pytest.raises(UserError, match="decides how the data becomes tokens"):
        prepare_shift("codebook_size=16", domain, corpus.read_meta(run_corpus), run_corpus, tmp_path / "data")


# --- compare ---

@pytest.mark.slow
def test_compare_tables_robustness_over_seeds_with_intervals(runs, other_text):
    from scipy import stats

    from shortcut.compare import compare

    base = [f"data.root={runs / 'data'}", "domain=text", "domain.source=files"]
    train(compose("train", base + TINY + ["model.exit_train=0.5", "train.max_steps=40", "seed=1", *STEPS]),
          runs / "baseline1")
    settings = ["eval.noise=[0.3]", f"eval.shift='files={other_text}/*.txt'", "eval.exit=confidence",
                "eval.exit_thresholds=[0.1,0.15]"]
    for run in ("shortcut", "baseline", "baseline1"):
        conditions_of(runs / run, *settings)
    out = compare(compose("compare", [f"runs='{runs}/shortcut,{runs}/baseline,{runs}/baseline1'",
                                      f"results_root={runs / 'results'}", "wandb=off"]))
    rows = {(r["variant"].split()[0], r["condition"]): r for r in out["robustness"]}
    assert {c for _, c in rows} == {"in-domain", "noise p=0.3", f"shift files={other_text}/*.txt"}
    noisy = rows[("baseline", "noise p=0.3")]
    evals = [json.loads((runs / r / "eval.json").read_text())["conditions"][1] for r in ("baseline", "baseline1")]
    d = [e["delta_nll"] for e in evals]
    half = stats.t.ppf(0.975, 1) * np.std(d, ddof=1) / np.sqrt(2)
    assert noisy["seeds"] == [0, 1] and noisy["delta_nll"]["mean"] == pytest.approx(np.mean(d))
    assert noisy["delta_nll"]["ci_high"] - noisy["delta_nll"]["mean"] == pytest.approx(half)
    assert noisy["threshold"] == 0.15  # 0.9 was not measured: the common threshold nearest it
    at = [next(t for t in e["exits"]["thresholds"] if t["threshold"] == 0.15) for e in evals]
    assert all(t["n_early"] > 0 for t in at)
    assert noisy["unsafe_share"]["mean"] == pytest.approx(np.mean([t["unsafe_share"] for t in at]))
    assert noisy["early_share"]["mean"] == pytest.approx(np.mean([t["early_share"] for t in at]))
    assert rows[("shortcut", "noise p=0.3")]["shallow_shift"] is not None  # one seed: a mean, no interval
    assert rows[("shortcut", "noise p=0.3")]["shallow_shift"]["ci_low"] is None
    assert rows[("baseline", "noise p=0.3")]["shallow_shift"] is None  # no depth weights
    md = (runs / "results" / "compare" / "table.md").read_text()
    assert "### Robustness" in md and "Unsafe early exits at confidence threshold 0.15" in md
    assert "characters outside the run's vocabulary" in md
    assert (runs / "results" / "compare" / "robustness.png").is_file()


def fake_eval(seed: int, shift_nll: float, unsafe: float | None, early: float, mass: float | None) -> dict:
    """eval.json's conditions as shortcut.robustness writes them, cut to what the table reads."""
    def cond(name, nll, unsafe_share, shift):
        depth = None if mass is None else {"shallow_mass": mass + shift, "shift": None if name == "in-domain" else
                                           {"shallow_mass": {"delta": shift}}}
        exits = {"thresholds": [{"threshold": t, "unsafe_share": unsafe_share, "early_share": early}
                                for t in (0.5, 0.9)]}
        return {"name": name, "nll": nll, "delta_nll": nll - 1.0, "inputs_hash": name, "depth": depth,
                "exits": exits}
    return {"conditions": [cond("in-domain", 1.0, unsafe, 0.0), cond("noise p=0.2", shift_nll, None if unsafe is None
                                                                      else unsafe + 0.1 * seed, 0.01 * seed)]}


def test_the_robustness_table_averages_seeds_with_t_intervals(tmp_path):
    from scipy import stats

    from shortcut.robustness_table import robustness_tables

    groups = [("ds", "shortcut", [(s, fake_eval(s, 1.2 + 0.1 * s, 0.2, 0.4, 0.6)) for s in range(3)]),
              ("ds", "baseline", [(s, fake_eval(s, 1.5, None, 0.3, None)) for s in range(3)]),
              ("other", "shortcut", [(0, {"test_nll": 1.0})])]  # no conditions: no table
    md, pictures, rows = robustness_tables(groups, tmp_path)
    by = {(r["variant"], r["condition"]): r for r in rows}
    assert {r["dataset"] for r in rows} == {"ds"} and pictures == [tmp_path / "robustness.png"]
    d = [0.2, 0.3, 0.4]
    half = stats.t.ppf(0.975, 2) * np.std(d, ddof=1) / np.sqrt(3)
    noisy = by[("shortcut", "noise p=0.2")]
    assert noisy["delta_nll"]["mean"] == pytest.approx(0.3)
    assert noisy["delta_nll"]["ci_low"] == pytest.approx(0.3 - half) and noisy["delta_nll"]["n"] == 3
    assert noisy["threshold"] == 0.9 and noisy["unsafe_share"]["mean"] == pytest.approx(0.3)
    assert noisy["unsafe_delta"]["mean"] == pytest.approx(0.1) and noisy["shallow_shift"]["mean"] == pytest.approx(0.01)
    assert by[("baseline", "noise p=0.2")]["shallow_shift"] is None
    assert by[("baseline", "noise p=0.2")]["delta_nll"]["ci_low"] == pytest.approx(0.5)  # no spread, no width
    assert "Unsafe early exits at confidence threshold 0.9" in md and "no early exit" in md


# --- the conditions in report.html ---

def test_the_report_shows_the_evaluations_conditions_and_no_others(runs, other_text):
    from shortcut import report
    from shortcut.audit import describe_vocab

    run, spec = runs / "baseline", f"eval.shift='files={other_text}/*.txt'"
    audit = ["eval.audit_sequences=6", "eval.audit_plots=6", "eval.audit_plot_tokens=32", "eval.max_tokens=400",
             "eval.exit=confidence", "eval.exit_thresholds=[0.3]", "eval.exit_max_tokens=100"]
    result = evaluate(compose("eval", [f"run_dir={run}", *audit, "eval.noise=[0.3]", spec]))
    page = run / "audit" / report.FILE
    doc = report.read(page)
    views = {c["name"]: c for c in doc["conditions"]}
    assert list(views) == [c["name"] for c in result["conditions"]]  # in-domain, noise p=0.3, the shift
    clean, noisy, shifted = doc["conditions"]
    assert [q["start"] for q in noisy["sequences"]] == [q["start"] for q in clean["sequences"]]
    data = TokenData(next((runs / "data" / "text").glob("files-*")), 32)
    val = np.asarray(data.splits["val"], dtype=np.int64)
    read = corrupt(val, 0.3, 0, data.vocab_size)  # what the noisy view's model read, recomputed by hand
    labels = describe_vocab(data)[0]
    for q, c in zip(noisy["sequences"], clean["sequences"]):
        s, n = q["start"], len(q["nll"])
        assert q["ids"] == c["ids"] == val[s:s + n + 1].tolist()  # the source's tokens are shown ...
        assert q["read"] == [[k, labels[read[s + k]]] for k in range(n) if read[s + k] != val[s + k]]
    assert sum(len(q["read"]) for q in noisy["sequences"]) > 0
    assert noisy["headline"]["test NLL"].startswith(f"{result['conditions'][1]['nll']:.4f}")
    V = data.vocab_size
    shifted_val = np.asarray(TokenData(result["conditions"][2]["corpus"], 32).splits["val"], dtype=np.int64)
    unknown = [(q, k) for q in shifted["sequences"] for k, i in enumerate(q["ids"]) if i < 0]
    assert unknown and all(q["sym"][k] == report.UNKNOWN and (k == 0 or q["nll"][k - 1] is None) for q, k in unknown)
    assert all(k == 0 or set(q["exit"]["nll"][k - 1]) == {None} for q, k in unknown)  # no exit NLL either
    for q in shifted["sequences"]:
        s = q["start"]
        assert q["ids"] == [-1 if i >= V else int(i) for i in shifted_val[s:s + len(q["ids"])]]
        assert all(v is not None for k, v in enumerate(q["nll"]) if q["ids"][k + 1] >= 0)
    assert "symbols the vocabulary lacks" in shifted["headline"] and shifted["exit_summary"]
    # another evaluation without the shift, and without the audit (so only the views are rewritten), of other
    # sizes: the shift's view leaves the page, the noise view keeps the page's windows, the header its numbers
    again = evaluate(compose("eval", [f"run_dir={run}", *audit[4:], "eval.max_tokens=300", "eval.audit_sequences=2",
                                      "eval.noise=[0.3]", "eval.audit=false"]))
    doc = report.read(page)
    assert [c["name"] for c in doc["conditions"]] == ["in-domain", "noise p=0.3"]
    assert [q["start"] for q in doc["conditions"][1]["sequences"]] == [q["start"] for q in clean["sequences"]]
    assert doc["identity"]["eval"]["n_tokens"] == again["n_tokens"] != result["n_tokens"]
    evaluate(compose("eval", [f"run_dir={run}", *audit[:-3], "eval.audit=false"]))
    assert [c["name"] for c in report.read(page)["conditions"]] == ["in-domain"]
