"""Issue 13's shortcut switches (shortcut_mode, tap_bias, shortcut_layers): causality, the add mode is the baseline
at step 0, the tap bias puts nearly all the mass on the deepest tap at init, every attention implementation equals
the reference with the bias (values and gradients), FLOPs and parameters equal the counter and the module, the
audit reports every shortcut block."""

import itertools
import math
from dataclasses import replace

import pytest
import torch
from conftest import (assert_causal_and_trainable, assert_flops_match_the_counter, assert_impl_matches_the_reference,
                      impls_to_test, tokens)

from shortcut.attention import ATTENTION, depth_context_attention_probs
from shortcut.config import AttnImpl, ModelConfig
from shortcut.blocks import LAST_TAP_MASS, last_tap_bias
from shortcut.costs import flops_per_token, param_counts
from shortcut.model import GPT

BASE = ModelConfig(arch="baseline", n_layer=3, n_head=2, n_embd=32, block_size=24, vocab_size=40)
SHORTCUT = replace(BASE, arch="shortcut")
MODERN = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
# The search grid at tiny size: mode x bias x taps (all, [0, L/2, L-1] = [0, 1, 2]) x shortcut_layers.
GRID = [dict(shortcut_mode=m, tap_bias=b, taps=t, shortcut_layers=n)
        for m, b, t, n in itertools.product(["replace", "add"], ["none", "last"], ["all", [0, 1, 2]], [1, 2])]
# A cover of the grid (every mode x taps x N, the bias alternating) and a few points for the modern baseline.
COVER = [m for m in GRID if (m["shortcut_mode"] == "add") ^ (m["tap_bias"] == "last") ^ (m["shortcut_layers"] == 2)]
MODERN_CASES = [(m, MODERN) for m in COVER[::2]]
IMPLS = impls_to_test()


def gid(v):
    return "-".join(str(x).replace(" ", "") for x in v.values()) if isinstance(v, dict) else str(v)


def perturb_shortcut(model, seed=1, scale=0.5):
    """Random values for the switches' own parameters (tap biases, the add branch), so none is at its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "tap_bias" in n or "shortcut_attn" in n or n.startswith(("depth_emb", "feature_maps")):
                p.add_(torch.randn(p.shape, generator=g) * scale)


# --- configuration ---

@pytest.mark.parametrize("bad,key", [
    ({"shortcut_layers": 0}, "shortcut_layers"), ({"shortcut_layers": 4}, "shortcut_layers"),
    ({"shortcut_layers": 2, "taps": [2]}, "shortcut_layers"),  # block 1 would read no tap
    ({"shortcut_mode": "both"}, "shortcut_mode"), ({"tap_bias": "first"}, "tap_bias")])
def test_bad_settings_name_the_key(bad, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        replace(SHORTCUT, **bad)


def test_which_taps_each_shortcut_block_reads():
    """Block i reads h_i (h_0 the embeddings) and attends over the taps l <= i."""
    cfg = replace(SHORTCUT, n_layer=6)
    assert cfg.shortcut_taps() == {5: [0, 1, 2, 3, 4, 5]}
    assert replace(cfg, shortcut_layers=2).shortcut_taps() == {4: [0, 1, 2, 3, 4], 5: [0, 1, 2, 3, 4, 5]}
    assert replace(cfg, shortcut_layers=3, taps=[0, 3, 5]).shortcut_taps() == {3: [0, 3], 4: [0, 3], 5: [0, 3, 5]}
    assert replace(cfg, shortcut_layers=6).shortcut_taps()[0] == [0]
    assert replace(SHORTCUT, taps=[2], tap_bias="last").tap_bias == "last"  # a single tap with a bias is fine


def test_state_dict_names():
    """Defaults keep today's names; add keeps the baseline's names for the block and adds shortcut_attn.*."""
    base = set(GPT(BASE).state_dict())
    add = set(GPT(replace(SHORTCUT, shortcut_mode="add", shortcut_layers=2, tap_bias="last")).state_dict())
    own = {k for k in add - base if not k.startswith(("feature_maps", "depth_emb"))}
    assert base <= add
    assert own == {f"blocks.{i}.shortcut_attn.{p}" for i in (1, 2) for p in
                   ("c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias", "tap_bias")}
    rep = set(GPT(replace(SHORTCUT, tap_bias="last")).state_dict()) - set(GPT(SHORTCUT).state_dict())
    assert rep == {"blocks.2.attn.tap_bias"}


# --- causality, training, the baseline at init ---

@pytest.mark.parametrize("mode,style", [(m, {}) for m in GRID] + MODERN_CASES, ids=gid)
def test_causal_and_trainable(mode, style):
    torch.manual_seed(0)
    model = GPT(replace(SHORTCUT, **mode, **style)).eval()
    perturb_shortcut(model)
    assert_causal_and_trainable(model)


@pytest.mark.parametrize("mode,style", [(m, s) for m in GRID if m["shortcut_mode"] == "add" for s in ({}, MODERN)
                                        if not s or m["tap_bias"] == "last"], ids=gid)
def test_add_mode_is_the_baseline_at_step_0(mode, style):
    """The baseline's weights in an add-mode model (its own parameters at their init) give the baseline's logits:
    the added branch's output projection is zero (GPT-2's depth scaling of c_proj must not undo that)."""
    torch.manual_seed(0)
    baseline = GPT(replace(BASE, **style)).eval()
    model = GPT(replace(SHORTCUT, **mode, **style)).eval()
    for i in model.block_taps:
        assert model.blocks[i].shortcut_attn.c_proj.weight.abs().max() == 0
        assert model.blocks[i].attn.c_proj.weight.std() > 0.005  # the kept self-attention is initialised as usual
    missing, unexpected = model.load_state_dict(baseline.state_dict(), strict=False)
    assert not unexpected and all(".shortcut_attn." in k or k.startswith(("feature_maps", "depth_emb"))
                                  for k in missing)
    x = tokens(B=3)
    assert (baseline(x)[0] - model(x)[0]).abs().max().item() <= 1e-5
    perturb_shortcut(model)  # and the branch acts once it moves
    assert (baseline(x)[0] - model(x)[0]).abs().max().item() > 1e-3


def test_degenerate_shortcut_with_a_tap_bias_is_the_baseline():
    """One tap: the bias adds a constant to every score of a softmax, which changes nothing."""
    torch.manual_seed(0)
    baseline = GPT(BASE).eval()
    cfg = replace(SHORTCUT, taps=[2], feature_map="none", depth_embedding=False, tap_bias="last")
    for impl in ("masked", "lse"):
        model = GPT(replace(cfg, attn_impl=impl)).eval()
        model.load_state_dict(baseline.state_dict(), strict=False)
        x = tokens(B=3)
        assert (baseline(x)[0] - model(x)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize("taps,n", [("all", 1), ("all", 2), ([0, 3, 6], 1), ([0, 3, 6], 2)], ids=gid)
def test_tap_bias_puts_nearly_all_the_mass_on_the_deepest_tap_at_init(mode, taps, n):
    """Random init, 7 layers, d=64, T=64: every shortcut block puts >= 0.99 of each token's attention on the
    deepest tap it reads, on average (>= 0.98 for every token); with equal scores it would be LAST_TAP_MASS."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(arch="shortcut", n_layer=7, n_head=4, n_embd=64, block_size=64, vocab_size=40,
                            taps=taps, shortcut_layers=n, shortcut_mode=mode, tap_bias="last")).eval()
    with torch.no_grad():
        lw = model.layer_weights(tokens(B=4, T=64))
    w = lw["weights"]  # (B, T, consumers, sources)
    for c, i in enumerate(model.block_taps):
        deepest = lw["sources"].index(model.block_taps[i][-1])
        mass = w[:, :, c, deepest]
        assert mass.mean() >= 0.99 and mass.min() >= 0.98, (i, mass.mean().item(), mass.min().item())
    assert LAST_TAP_MASS == 0.995


def test_replace_with_tap_bias_starts_close_to_the_baseline():
    """replace + tap_bias=last reads ~h_{L-1} through the identity feature map: its logits at init are far closer
    to the baseline's (with the baseline's weights loaded) than those of the plain shortcut, spread over all taps."""
    torch.manual_seed(0)
    baseline = GPT(BASE).eval()
    x = tokens(B=3)
    gaps = {}
    for bias in ("none", "last"):
        model = GPT(replace(SHORTCUT, tap_bias=bias)).eval()
        model.load_state_dict(baseline.state_dict(), strict=False)
        gaps[bias] = (baseline(x)[0] - model(x)[0]).abs().max().item()
    assert gaps["last"] < 0.1 * gaps["none"], gaps


# --- attention implementations with a tap bias: the reference's values and gradients ---

def qkvb(B, nh, K, T, hs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, hs, generator=g)
    kv = torch.randn(B, K, T, 2 * nh * hs, generator=g)  # as the model makes them: views of one projection
    k, v = (t.view(B, K, T, nh, hs).permute(0, 3, 1, 2, 4) for t in kv.split(nh * hs, dim=-1))
    bias = torch.randn(nh, K, generator=g) * 2
    return [t.detach().requires_grad_() for t in (q, k, v, bias)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K,T", [(1, 1), (3, 1), (1, 24), (4, 17), (2, 70), (5, 129)])
def test_attention_impls_with_a_tap_bias_match_the_reference(impl, K, T):
    device = "cuda" if impl == AttnImpl.flex else "cpu"
    q, k, v, bias = (t.detach().to(device).requires_grad_() for t in qkvb(2, 3, K, T, 16))
    dy = torch.randn(2, 3, T, 16, generator=torch.Generator().manual_seed(1)).to(device)
    outs = []
    for f in (ATTENTION[AttnImpl.masked], ATTENTION[impl]):
        y = f(q, k, v, bias=bias)
        outs.append((y, *torch.autograd.grad(y, (q, k, v, bias), dy)))
    for name, ref, got in zip("y q k v bias".split(), *outs):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != AttnImpl.flex])
def test_a_bf16_tap_bias_gradient_is_summed_in_float32(impl):
    """The bias' gradient sums one term per key, terms that nearly cancel at the `last` initialisation: from bf16
    values it would be ~15% off. Every CPU implementation gets it within 1% of float64 (bf16 inputs, autocast)."""
    q, k, v, _ = (t.detach().double() for t in qkvb(2, 4, 6, 64, 16))
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bias = last_tap_bias(4, 6).view(4, 6).double().requires_grad_()
    ref, = torch.autograd.grad(ATTENTION[AttnImpl.masked](q, k, v, bias=bias), bias, dy)
    low = bias.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ATTENTION[impl](q.bfloat16(), k.bfloat16(), v.bfloat16(), bias=low)
    got, = torch.autograd.grad(y, low, dy.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= 0.01 * ref.abs().max()


def test_the_reference_with_a_tap_bias_is_its_equation():
    """softmax over (l, s <= t) of q_t·k_ls/√hs + b_l, written out; and the audit's chunked probabilities agree."""
    q, k, v, bias = (t.detach() for t in qkvb(2, 3, 4, 30, 8))
    scores = (q @ k.flatten(2, 3).transpose(-2, -1) / math.sqrt(8)).view(2, 3, 30, 4, 30) + bias[None, :, None, :, None]
    future = torch.ones(30, 30, dtype=torch.bool).triu(diagonal=1)[:, None, :]  # (t, 1, s)
    probs = scores.masked_fill(future, float("-inf")).flatten(3).softmax(-1)  # (B, nh, T, K*T)
    y = probs @ v.flatten(2, 3)
    torch.testing.assert_close(ATTENTION[AttnImpl.masked](q, k, v, bias=bias), y, atol=1e-5, rtol=1e-5)
    y2, p2 = depth_context_attention_probs(q, k, v, bias=bias, chunk_bytes=3 * 4 * 2 * 3 * 4 * 30 * 7)
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p2, probs.view(2, 3, 30, 4, 30), atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_with_a_tap_bias_on_cpu_forward():
    """flex's score_mod bias, checked where it can run here: eager, forward only (its gradient: on CUDA above)."""
    q, k, v, bias = (t.detach() for t in qkvb(2, 2, 3, 37, 16))
    torch.testing.assert_close(ATTENTION[AttnImpl.flex](q, k, v, bias=bias),
                               ATTENTION[AttnImpl.masked](q, k, v, bias=bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != AttnImpl.masked])
@pytest.mark.parametrize("mode", [dict(shortcut_mode="replace", tap_bias="last", shortcut_layers=2),
                                  dict(shortcut_mode="add", tap_bias="last", shortcut_layers=2, taps=[0, 2, 3]),
                                  dict(shortcut_mode="add", tap_bias="none", shortcut_layers=3)], ids=gid)
def test_models_with_each_impl_match_the_reference(impl, mode):
    """Logits, loss and every parameter's gradient (tap biases and the add branch perturbed off their init)."""
    assert_impl_matches_the_reference(replace(SHORTCUT, n_layer=4, block_size=80, **mode), impl, 37, perturb_shortcut)


# --- counts: exact against torch's counter and the module ---

@pytest.mark.parametrize("mode,style,T", [(m, {}, 24) for m in COVER] + [(m, s, 13) for m, s in MODERN_CASES]
                         + [(dict(shortcut_mode="add", shortcut_layers=3, feature_map="linear"), {}, 24)], ids=gid)
def test_flops_and_params_match_the_counter(mode, style, T):
    cfg = replace(SHORTCUT, **mode, **style)
    model = GPT(replace(cfg, attn_impl="masked"))
    perturb_shortcut(model)
    x = tokens(B=2, T=T)
    assert_flops_match_the_counter(model, cfg, x)
    counts = param_counts(cfg)
    assert counts.params == sum(p.numel() for p in model.parameters())
    tables = 40 * 32 + (24 * 32 if cfg.pos == "learned" else 0)
    assert counts.non_embedding_params == counts.params - tables


def test_sparse_taps_cost_less_and_add_costs_more():
    """What compare shows per row: each choice has its own parameter and FLOP count."""
    cfg = replace(SHORTCUT, n_layer=12, n_embd=64, n_head=4, block_size=128)
    sparse = replace(cfg, taps=[0, 6, 11])
    f = lambda c: flops_per_token(c).forward  # noqa: E731
    p = lambda c: param_counts(c).params  # noqa: E731
    assert f(replace(cfg, arch="baseline")) < f(sparse) < f(cfg) < f(replace(cfg, shortcut_mode="add"))
    assert f(cfg) < f(replace(cfg, shortcut_layers=2))
    assert p(replace(cfg, arch="baseline")) < p(sparse) < p(cfg) < p(replace(cfg, shortcut_mode="add"))
    assert p(replace(cfg, tap_bias="last")) == p(cfg) + 4 * 12


# --- the depth audit ---

@pytest.mark.parametrize("mode", [m for m in COVER if m["shortcut_layers"] == 2], ids=gid)
def test_layer_weights_report_every_shortcut_block(mode):
    torch.manual_seed(0)
    model = GPT(replace(SHORTCUT, **mode)).eval()
    perturb_shortcut(model)
    x = tokens()
    with torch.no_grad():
        lw = model.layer_weights(x)
        _, probs = model.depth_attention(x)
        states = model.hidden_states(x)
    assert lw["consumers"] == ["block 1", "final block"] and lw["sources"] == model.taps
    w = lw["weights"]  # (B, T, 2, K)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 24, 2))
    assert (w[:, :, 0, [j for j, l in enumerate(model.taps) if l > 1]] == 0).all()  # block 1 reads taps <= 1
    torch.testing.assert_close(w[:, :, 1], probs.sum(-1))  # the final block's: what depth_attention gives
    assert len(states) == 3 and torch.equal(states[0], model.embed(x)[0])


def test_a_searched_shortcut_trains_evaluates_and_audits(tmp_path, prepared):
    """Through the commands: add mode, a tap bias, two shortcut blocks; depth.json names both consumers."""
    import json

    from conftest import TINY

    from shortcut.cli import compose
    from shortcut.evaluate import evaluate
    from shortcut.train import train

    run = tmp_path / "sc"
    train(compose("train", prepared + TINY + ["model=shortcut", "model.shortcut_mode=add", "model.tap_bias=last",
                                              "model.shortcut_layers=2", "train=smoke", "train.max_steps=4"]), run)
    evaluate(compose("eval", [f"run_dir={run}", "eval.audit_sequences=2", "eval.max_tokens=256"]))
    depth = json.loads((run / "audit" / "depth.json").read_text())
    lw = depth["layer_weights"]
    assert lw["consumers"] == ["block 0", "final block"] and lw["sources"] == [0, 1]
    assert depth["mean_profile"] == pytest.approx(lw["mean"], abs=1e-5)  # both: the final block's mass
    assert depth["mean_profile"][-1] > 0.9  # 4 steps from the tap bias' init
