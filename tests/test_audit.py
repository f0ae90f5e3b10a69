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
    assert "audit" not in json.loads((tmp_path / "b" / "eval.json").read_text())


def test_music_labels_are_token_names(tmp_path):
    from shortcut.audit import describe_vocab
    from shortcut.prepare import prepare

    out = prepare(compose("prepare", [f"data.root={tmp_path}", "domain=music", "domain.max_pieces=4"]))
    labels, classes, axis = describe_vocab(TokenData(out, 16))
    assert "Bar" in labels and any(lbl.startswith("P") for lbl in labels)
    assert {"pitch", "position", "bar"} <= set(classes) and axis == "token"
