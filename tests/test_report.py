"""report.html (issue 23): the page `shortcut eval` writes holds the audit's own numbers for every shown token, in
the domain's symbols, renders in a real browser (headless Chromium) without script errors, and is self-contained."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import TINY, english_like
from shortcut import report
from shortcut.cli import compose
from shortcut.config import ModelConfig
from shortcut.data import TokenData
from shortcut.early_exit import confidence_choices
from shortcut.evaluate import evaluate
from shortcut.model import GPT
from shortcut.train import train

AUDIT = ["eval.audit_sequences=4", "eval.audit_plots=2", "eval.audit_plot_tokens=24", "eval.exit=both",
         "eval.exit_thresholds=[0.1,0.5,0.9]"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from shortcut.prepare import prepare

    root = tmp_path_factory.mktemp("report")
    (root / "texts").mkdir()
    for i in range(2):
        (root / "texts" / f"part{i}.txt").write_text(english_like(3000, seed=i))
    base = [f"data.root={root / 'data'}", "domain=text", "domain.source=files"]
    return prepare(compose("prepare", base + [f"domain.files={root}/texts/*.txt"])), base


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    """A shortcut and a baseline (3 layers, d=32, T=32, weights moved off their init so that attention and exits
    are not uniform) audited on the char corpus with exits measured; {arch: audit dir}."""
    from shortcut.audit import audit

    data = TokenData(corpus_dir[0], 32)
    cfg = compose("eval", ["run_dir=x", *AUDIT]).eval
    out = {}
    for arch in ("shortcut", "baseline"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(arch=arch, n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=data.vocab_size))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        out[arch] = tmp_path_factory.mktemp(arch) / "audit"
        audit(model.eval(), data, out[arch], cfg, checkpoint_hash="cafe")
        out[arch + "-model"] = model
    return out


def test_the_page_holds_the_audits_numbers_for_every_shown_token(runs):
    out = runs["shortcut"]
    doc = report.read(out / report.FILE)  # the embedded data parses
    depth = json.loads((out / "depth.json").read_text())
    saved = np.load(out / "attention.npz")
    assert doc["identity"]["checkpoint_hash"] == depth["checkpoint_hash"] == "cafe"
    assert "model.arch=shortcut" in doc["identity"]["settings"] and "model.n_layer=3" in doc["identity"]["settings"]
    [cond] = doc["conditions"]
    assert cond["kind"] == "in-domain" and doc["caps"] == {"sequences": 2, "tokens": 24}
    np.testing.assert_allclose(cond["mean_profile"], depth["mean_profile"], rtol=1e-6)
    assert cond["mean_depth"] == pytest.approx(depth["mean_depth"]) and cond["sources"] == depth["taps"]
    assert cond["spearman_depth_vs_loss"] == depth["spearman_depth_vs_loss"]
    assert cond["nll"] == pytest.approx(float(saved["loss"].mean()), rel=1e-6)
    for r, seq in enumerate(cond["sequences"]):
        ids = [int(saved["inputs"][r, 0])] + saved["targets"][r, :24].tolist()  # every shown token, in order
        assert seq["ids"] == ids and len(seq["sym"]) == 25 and seq["start"] == int(saved["starts"][r])
        np.testing.assert_allclose(seq["nll"], saved["loss"][r, :24], atol=6e-4)
        np.testing.assert_allclose(seq["profile"], saved["profile"][r, :24], atol=6e-4)
        np.testing.assert_allclose(seq["depth"], saved["profile"][r, :24] @ saved["taps"], atol=2e-3)
        for q, pairs in enumerate(seq["top"]):  # the query at position q attends to keys 0..q (elements 0..q)
            assert pairs and all(0 <= e <= q and 0 <= j < len(cond["sources"]) for e, j, _ in pairs)
    attn = saved["first_sequence_attention"]  # (T, K, T): window 0's head-averaged map
    for q, pairs in enumerate(cond["sequences"][0]["top"]):  # its strongest pairs, with their weights
        assert [w for _, _, w in pairs] == pytest.approx(np.sort(attn[q].ravel())[::-1][:len(pairs)], abs=6e-4)
        assert all(attn[q, j, e] == pytest.approx(w, abs=6e-4) for e, j, w in pairs)


def test_its_exits_are_the_policies_own(runs):
    cond = report.read(runs["shortcut"] / report.FILE)["conditions"][0]
    model = runs["shortcut-model"]
    saved = np.load(runs["shortcut"] / "attention.npz")
    x = torch.from_numpy(saved["inputs"][:2, :24]).long()
    full = model(x)[0].argmax(-1)
    full_depth = model.cfg.exit_depths()[-1]
    for j, t in enumerate(cond["sequences"][0]["exit"]["thresholds"]):
        tokens, depth = confidence_choices(model, x, t)  # what greedy exit decoding emits, and where
        for r, seq in enumerate(cond["sequences"]):
            assert [d[j] for d in seq["exit"]["depth"]] == depth[r].tolist()
            assert [u[j] for u in seq["exit"]["differs"]] == (tokens[r] != full[r]).int().tolist()
            for q in range(24):  # at the full depth a token differs only by reading earlier exits' copied states
                if seq["exit"]["differs"][q][j] and seq["exit"]["depth"][q][j] == full_depth:
                    assert any(seq["exit"]["depth"][p][j] < full_depth for p in range(q))
        flat_depth = np.array([d[j] for s in cond["sequences"] for d in s["exit"]["depth"]])
        flat_differs = np.array([u[j] for s in cond["sequences"] for u in s["exit"]["differs"]])
        early = flat_depth < full_depth
        row = cond["exit_summary"][j]  # unsafe: of the tokens that exit early, those whose top-1 is not the model's
        assert row["threshold"] == t and row["early_share"] == pytest.approx(early.mean())
        assert row["unsafe_share"] == (pytest.approx(flat_differs[early].mean()) if early.any() else None)
    shares = [row["early_share"] for row in cond["exit_summary"]]
    assert shares[0] > 0 and shares == sorted(shares, reverse=True)  # a lower bar lets more tokens out
    fixed = cond["sequences"][0]["fixed"]
    assert fixed["depths"] == model.cfg.exit_depths()
    np.testing.assert_allclose([n[-1] for n in fixed["nll"]], cond["sequences"][0]["nll"], atol=2e-3)  # full depth


def test_the_baseline_page_has_tokens_and_nll_and_says_it_has_no_depth_attention(runs):
    page = (runs["baseline"] / report.FILE).read_text()
    doc = report.read(runs["baseline"] / report.FILE)
    cond = doc["conditions"][0]
    assert doc["depth_attention"] is None and "mean_profile" not in cond
    assert all("profile" not in s and "top" not in s and len(s["nll"]) == 24 and "exit" in s for s in cond["sequences"])
    assert "no depth attention" in page


def test_the_page_is_self_contained_and_states_its_size(runs):
    path = runs["shortcut"] / report.FILE
    page = path.read_text()
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(|fetch\(|XMLHttpRequest", page)
    assert set(re.findall(r"https?://[^\s\"']+", page)) <= {"http://www.w3.org/2000/svg"}  # a namespace, not a fetch
    stated = report.read(path)["size_bytes"]
    assert abs(stated - path.stat().st_size) < 16 and path.stat().st_size < 200_000


def test_conditions_replace_every_earlier_one_but_in_domain(runs, tmp_path):
    path = tmp_path / report.FILE
    shutil.copy(runs["shortcut"] / report.FILE, path)
    doc = report.read(path)
    noisy = {**doc["conditions"][0], "name": "noise p=0.2", "kind": "noise", "headline": {"ΔNLL vs in-domain": 0.5}}
    report.set_conditions(path, [noisy, {**noisy, "name": "noise p=0.05"}])
    report.set_conditions(path, [{**noisy, "nll": 9.0}])  # an evaluation without p=0.05: its view goes
    names = [c["name"] for c in report.read(path)["conditions"]]
    assert names == ["in-domain", "noise p=0.2"] and report.read(path)["conditions"][1]["nll"] == 9.0
    report.set_conditions(path, [])
    assert [c["name"] for c in report.read(path)["conditions"]] == ["in-domain"]


@pytest.mark.slow
def test_music_tokens_are_remi_names_with_a_piano_roll(tmp_path):
    from shortcut.audit import audit
    from shortcut.prepare import prepare
    from shortcut.prepare.music import load_tokenizer

    out = prepare(compose("prepare", [f"data.root={tmp_path}", "domain=music", "domain.max_pieces=4"]))
    data = TokenData(out, 32)
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="shortcut", n_layer=2, n_head=2, n_embd=32, block_size=32,
                            vocab_size=data.vocab_size)).eval()
    cfg = compose("eval", ["run_dir=x", "eval.audit_sequences=2", "eval.audit_plots=2", "eval.audit_plot_tokens=32"]).eval
    audit(model, data, tmp_path / "audit", cfg)
    tok = load_tokenizer(out)
    for seq in report.read(tmp_path / "audit" / report.FILE)["conditions"][0]["sequences"]:
        assert seq["name"] == [tok[i] for i in seq["ids"]]  # the run's own tokenizer's names
        pitches = [k for k, n in enumerate(seq["name"]) if n.startswith("Pitch_")]
        assert [e for *_, e in seq["roll"]] == [k for k in pitches if any(n.startswith("Duration_")
                                                                        for n in seq["name"][k + 1:k + 3])]
        assert all(p == int(seq["name"][e].split("_")[1]) and d > 0 for _, d, p, e in seq["roll"])


def test_piano_roll_reads_bars_positions_and_durations():
    names = ["Position_4", "Pitch_60", "Velocity_63", "Duration_1.0.8", "Bar_None", "Position_0", "Pitch_64",
             "Duration_0.4.8", "Position_8", "Pitch_67", "Duration_2.0.8", "Bar_None", "TimeSig_3/4", "Bar_None",
             "Position_0", "Pitch_72", "Duration_1.0.8"]  # a window from mid-bar; then a 4/4 bar, a 3/4 bar
    assert report.piano_roll(names, per_beat=8) == [[0.5, 1.0, 60, 1], [4.0, 0.5, 64, 6], [5.0, 2.0, 67, 9],
                                                    [11.0, 1.0, 72, 15]]
    midi_like = ["NoteOn_60", "TimeShift_1.0.8", "NoteOn_62", "TimeShift_0.4.8", "NoteOff_60", "NoteOff_62"]
    assert report.piano_roll(midi_like, per_beat=8) == [[0.0, 1.5, 60, 0], [1.0, 0.5, 62, 2]]


def test_the_audio_strip_is_each_tokens_centroid(tmp_path):
    class Data:  # what audio_strip reads of a TokenData
        meta = {"tokenizer": "kmeans", "domain": "audio"}
        path = tmp_path

    book = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    np.save(tmp_path / "codebook.npy", book)
    strip = report.audio_strip(Data(), [3, 3, 5, 0])
    values = np.array(strip["values"])  # (tokens, rows)
    assert strip["rows"] == report.STRIP_ROWS and values.shape == (4, report.STRIP_ROWS)
    assert (values[0] == values[1]).all() and values.min() == 0 and values.max() == 255
    bands = book[[3, 5, 0]].reshape(3, report.STRIP_ROWS, 2).mean(-1)
    assert np.corrcoef(values[[1, 2, 3]].ravel(), bands.ravel())[0, 1] > 0.999  # a linear rescale of the bands


def test_the_wandb_tracker_logs_the_page_unchanged(runs):
    import wandb

    from shortcut.tracking import Tracker, WandbTracker

    logged = []
    tracker = WandbTracker.__new__(WandbTracker)
    tracker.run = type("Run", (), {"log": lambda self, d, step=None: logged.append((d, step))})()
    path = runs["shortcut"] / report.FILE
    tracker.html({"audit/report": path, "audit/missing": path.with_name("none.html")}, 15)
    [(values, step)] = logged
    assert step == 15 and list(values) == ["audit/report"] and isinstance(values["audit/report"], wandb.Html)
    assert values["audit/report"].html == path.read_text()  # no stylesheet injected: still self-contained
    Tracker().html({"audit/report": path})  # wandb=off: nothing, no error


# --- in a real browser ---

def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def browse(page, tmp_path, fragment: str = "", screenshot: str | None = None) -> tuple[str, str]:
    """(the DOM after the page's script ran, the browser's log) from headless Chromium; a screenshot on request."""
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium): the browser check needs one")
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr",
            "--v=0", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"]
    url = f"file://{page}{fragment}"
    done = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    if screenshot:
        subprocess.run(args + [f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return done.stdout, done.stderr


@pytest.mark.parametrize("arch", ["shortcut", "baseline"])
def test_the_page_renders_in_chromium_without_errors(runs, tmp_path, arch):
    path = tmp_path / report.FILE
    shutil.copy(runs[arch] / report.FILE, path)
    doc = report.read(path)
    noisy = json.loads(json.dumps(doc["conditions"][0]))
    q = noisy["sequences"][1]
    q["nll"][11], q["sym"][12], q["read"] = None, report.UNKNOWN, [[12, "x"], [3, "y"]]  # unscored, read otherwise
    report.set_conditions(path, [{**noisy, "name": "noise p=0.2", "kind": "noise"}])
    dom, log = browse(path, tmp_path, "#c=1&s=1&k=12", screenshot=str(tmp_path / "report.png"))
    assert "Uncaught" not in log and not re.search(r"CONSOLE.*(Error|error)", log), log[-2000:]
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-rendered="ok"' in body, dom[:2000]
    n_tokens = sum(len(s["sym"]) for s in doc["conditions"][0]["sequences"])
    assert f'data-tokens="{n_tokens}"' in body and len(re.findall(r'class="tok[ "]', dom)) == n_tokens
    assert re.search(r'<div id="errors"></div>', dom)  # the page's own error catcher caught nothing
    assert len(re.findall(r"<button", dom)) == 2  # the condition switch: in-domain, noise
    panel = re.search(r'<aside id="panel">(.*?)</aside>', dom, re.S).group(1)  # the pinned token's details
    assert "NLL" in panel and "confidence exits" in panel
    assert "not scored" in panel and "read as" in panel and len(re.findall(r'class="tok[^"]* noisy', dom)) == 2
    if arch == "shortcut":
        assert "its attention over taps" in panel and "tok hit" in dom and re.search(r'class="tok[^"]*\bsel\b', dom)
    else:
        assert "no depth attention" in panel
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_shortcut_eval_writes_the_page_with_the_runs_identity(corpus_dir, tmp_path):
    base = corpus_dir[1]
    train(compose("train", base + TINY + ["model=shortcut", "train.max_steps=15"]), tmp_path / "run")
    evaluate(compose("eval", [f"run_dir={tmp_path / 'run'}", *AUDIT, "eval.max_tokens=300", "eval.exit_max_tokens=100"]))
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    doc = report.read(tmp_path / "run" / "audit" / report.FILE)
    ident = doc["identity"]
    assert ident["run"] == "run" and ident["checkpoint_step"] == record["checkpoint_step"] == 15
    assert ident["checkpoint_hash"] == record["checkpoint_hash"] and ident["corpus"]["data_hash"] == record["data_hash"]
    assert ident["eval"]["nll"] == pytest.approx(record["test_nll"]) and ident["eval"]["split"] == "test"
    assert ident["finished"] is True and doc["conditions"][0]["sequences"][0]["exit"]
