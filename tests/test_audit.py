"""The depth audit: profiles are distributions over taps, a forced tap is reported, files have the documented keys."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from shortcut.audit import audit, measure
from shortcut.cli import compose
from shortcut.data import TokenData
from shortcut.evaluate import evaluate, load_run
from shortcut.train import train

KEYS = {"mean_profile", "mean_profile_per_head", "mean_depth", "depth_entropy_nats", "share_shallow",
        "spearman_depth_vs_loss", "by_class", "logit_lens_nll", "taps", "pictures"}


@pytest.fixture
def shortcut_run(tmp_path, prepared):
    train(compose("train", prepared + TINY + ["model=shortcut", "model.n_layer=3", "train.max_steps=20"]),
          tmp_path / "sc")
    return tmp_path / "sc"


def test_profiles_are_distributions_over_taps(shortcut_run):
    model, data, _ = load_run(shortcut_run)
    cfg = compose("eval", [f"run_dir={shortcut_run}", "eval.audit_sequences=4"]).eval
    m = measure(model, data, cfg)
    assert m["profile"].shape == (4, 32, 3) and m["profile_heads"].shape == (4, 2, 32, 3)
    torch.testing.assert_close(m["profile"].sum(-1), torch.ones(4, 32))
    torch.testing.assert_close(m["profile_heads"].mean(1), m["profile"])
    # each query's attention over (tap, key) sums to one, and never looks ahead
    torch.testing.assert_close(m["attn"].sum(dim=(1, 2)), torch.ones(32))
    assert m["attn"].permute(1, 0, 2).triu(diagonal=1).abs().max() == 0
    # the losses are the model's own
    x, y = m["inputs"], m["targets"]
    ref = F.cross_entropy(model(x)[0].transpose(1, 2), y, reduction="none")
    torch.testing.assert_close(m["loss"], ref)


def test_forced_tap_is_reported(shortcut_run, tmp_path):
    model, data, _ = load_run(shortcut_run)
    C, j = model.cfg.n_embd, 1
    with torch.no_grad():  # a huge depth embedding on tap j, and queries that look only for it
        u = torch.randn(C)
        model.depth_emb.zero_()
        model.depth_emb[j] = 1000 * u
        attn = model.blocks[-1].attn.c_attn
        attn.weight[:C] = 0
        attn.bias[:C] = 50 * F.layer_norm(u, (C,))
        attn.weight[C:2 * C] = torch.eye(C)
        attn.bias[C:2 * C] = 0
    summary = audit(model, data, tmp_path / "audit", compose("eval", ["run_dir=x", "eval.audit_sequences=4"]).eval)
    assert summary["mean_profile"][j] > 0.99
    assert summary["mean_depth"] == pytest.approx(model.taps[j], abs=0.02)


def test_eval_writes_the_audit(shortcut_run):
    evaluate(compose("eval", [f"run_dir={shortcut_run}", "eval.audit_sequences=6"]))
    out = shortcut_run / "audit"
    depth = json.loads((out / "depth.json").read_text())
    assert KEYS <= set(depth)
    for name in ("depth_profile.png", "attention_map.png", "depth_histogram.png", "logit_lens.png"):
        assert (out / name).stat().st_size > 5000
    assert {"space", "letter"} <= set(depth["by_class"])
    assert sum(c["n_tokens"] for c in depth["by_class"].values()) == depth["spearman_depth_vs_loss"]["n_tokens"]
    sp = depth["spearman_depth_vs_loss"]
    assert sp["n_sequences"] == 6 and {"ci_low", "ci_high", "p_value", "method", "within_position_rho"} <= set(sp)
    # the JSON agrees with a recomputation from the saved attention
    saved = np.load(out / "attention.npz")
    profile = saved["profile"].reshape(-1, len(depth["taps"]))
    np.testing.assert_allclose(depth["mean_profile"], profile.mean(0), rtol=1e-5)
    depths = profile @ saved["taps"]
    from scipy.stats import spearmanr

    assert depth["spearman_depth_vs_loss"]["rho"] == pytest.approx(spearmanr(depths, saved["loss"].ravel())[0], abs=1e-6)
    assert depth["share_shallow"] == pytest.approx((profile[:, saved["taps"] < 1.5].sum(1) > 0.5).mean())
    assert json.loads((shortcut_run / "eval.json").read_text())["audit"]["mean_profile"] == depth["mean_profile"]


def test_baseline_gets_the_logit_lens(tmp_path, prepared):
    train(compose("train", prepared + TINY + ["train.max_steps=20"]), tmp_path / "b")
    evaluate(compose("eval", [f"run_dir={tmp_path / 'b'}"]))
    depth = json.loads((tmp_path / "b" / "audit" / "depth.json").read_text())
    assert len(depth["logit_lens_nll"]) == 3 and "mean_profile" not in depth
    # read at the embeddings the head knows little; read at the output it knows what the model knows
    assert depth["logit_lens_nll"][-1] < depth["logit_lens_nll"][0]
    assert (tmp_path / "b" / "audit" / "logit_lens.png").is_file()
    evaluate(compose("eval", [f"run_dir={tmp_path / 'b'}", "eval.audit=false"]))
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["audit"] is None
    assert (tmp_path / "b" / "audit" / "depth.json").is_file()  # still the same checkpoint's audit


def test_music_labels_are_token_names(tmp_path):
    from shortcut.audit import describe_vocab
    from shortcut.prepare import prepare

    out = prepare(compose("prepare", [f"data.root={tmp_path}", "domain=music", "domain.max_pieces=4"]))
    labels, classes, axis = describe_vocab(TokenData(out, 16))
    assert "Bar" in labels and any(lbl.startswith("P") for lbl in labels)
    assert {"pitch", "position", "bar"} <= set(classes) and axis == "token"


# --- statistics of summarise: the audit window is the resampling unit, and position is not depth ---

def synthetic(depth: np.ndarray, loss: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """A dict shaped like measure()'s output for taps [0, 1], where a token's mean depth is its mass on tap 1."""
    n, T = depth.shape
    profile = torch.from_numpy(np.stack([1 - depth, depth], axis=-1)).float()  # (n, T, 2)
    return {"lens": np.zeros(3), "starts": np.arange(n) * T, "profile": profile,
            "profile_heads": profile[:, None].expand(n, 2, T, 2), "loss": torch.from_numpy(loss).float(),
            "targets": torch.from_numpy(np.zeros((n, T), dtype=np.int64) if targets is None else targets)}


def spearman_stats(depth, loss, targets=None, **kw) -> dict:
    from shortcut.audit import summarise

    return summarise(synthetic(depth, loss, targets), [0, 1], 2, ["a", "b"], **kw)["spearman_depth_vs_loss"]


def test_resampled_ranks_are_scipy_spearman():
    from scipy.stats import spearmanr

    from shortcut.audit import _pooled_spearman, _within_position_spearman

    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (7, 9)).astype(float)  # many ties
    y = x + rng.integers(0, 4, (7, 9))
    y[:, 0] = 1.0  # a constant position is skipped
    draw = rng.integers(0, 7, 7)
    w = np.bincount(draw, minlength=7)[None].astype(float)
    seq = np.repeat(np.arange(7), 9)
    assert _pooled_spearman(x.ravel(), y.ravel(), seq, w)[0] == pytest.approx(spearmanr(x[draw].ravel(), y[draw].ravel())[0])
    per_position = [spearmanr(x[draw, t], y[draw, t])[0] for t in range(9)
                    if np.ptp(x[draw, t]) > 0 and np.ptp(y[draw, t]) > 0]
    assert _within_position_spearman(x, y, w)[0] == pytest.approx(np.mean(per_position))


def test_position_does_not_pass_for_depth():
    rng = np.random.default_rng(3)  # data on which the true within-position rho (0) is not at the interval's edge
    pos = np.linspace(0, 1, 64)[None]  # both fall along the window, otherwise independent
    depth = np.clip(0.8 - 0.6 * pos + 0.1 * rng.standard_normal((24, 64)), 0, 1)
    loss = 3 - 2 * pos + 0.3 * rng.standard_normal((24, 64))
    s = spearman_stats(depth, loss)
    assert s["rho"] > 0.5 and s["ci_low"] > 0.3 and s["p_value"] < 0.01
    assert abs(s["within_position_rho"]) < 0.1
    assert s["within_position_ci_low"] < 0 < s["within_position_ci_high"]
    assert s["n_tokens"] == 24 * 64 and s["n_sequences"] == 24 and "24 sequences" in s["method"]


def test_a_real_per_token_correlation_is_found():
    rng = np.random.default_rng(2)
    depth = rng.uniform(0, 1, (16, 48))
    loss = depth + 0.5 * rng.standard_normal((16, 48))
    targets = rng.integers(0, 2, (16, 48))
    from shortcut.audit import summarise

    result = summarise(synthetic(depth, loss, targets), [0, 1], 2, ["a", "b"], n_boot=400)
    s = result["spearman_depth_vs_loss"]
    assert s["ci_low"] > 0.3 and s["p_value"] == pytest.approx(1 / 400)
    assert s["ci_low"] <= s["rho"] <= s["ci_high"]
    assert s["within_position_ci_low"] > 0.2
    for entry in result["by_class"].values():  # each class alone, resampling the same windows
        c = entry["spearman_depth_vs_loss"]
        assert c["ci_low"] > 0.2 and c["p_value"] < 0.01 and c["ci_low"] <= c["rho"] <= c["ci_high"]


def test_copies_of_a_token_are_not_evidence():
    rng = np.random.default_rng(3)
    d = rng.uniform(0, 1, 12)
    l = d + 0.6 * rng.standard_normal(12)
    depth, loss = np.repeat(d[:, None], 50, 1), np.repeat(l[:, None], 50, 1)  # each window one token, 50 times
    s = spearman_stats(depth, loss)
    # a token-level (Fisher z) interval would take the 600 copies for 600 tokens
    half = 1.96 / np.sqrt(600 - 3)
    naive = np.tanh(np.arctanh(s["rho"]) + half) - np.tanh(np.arctanh(s["rho"]) - half)
    assert s["ci_high"] - s["ci_low"] > 3 * naive
    assert s["within_position_rho"] == pytest.approx(s["rho"])  # every position sees the same 12 windows


def test_summary_is_deterministic():
    rng = np.random.default_rng(4)
    depth, loss = rng.uniform(0, 1, (8, 16)), rng.standard_normal((8, 16))
    targets = rng.integers(0, 2, (8, 16))
    from shortcut.audit import summarise

    runs = [json.dumps(summarise(synthetic(depth, loss, targets), [0, 1], 2, ["a", "b"], n_boot=200)) for _ in range(2)]
    assert runs[0] == runs[1]
    assert spearman_stats(depth, loss, n_boot=200, seed=1) != spearman_stats(depth, loss, n_boot=200)
