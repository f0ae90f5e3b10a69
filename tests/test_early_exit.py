"""Early exit (issue 12): exit heads, LayerSkip-style training, the fixed and confidence (CALM) policies, their
analytic cost against the FLOP counter, and the curve through `shortcut eval eval.exit=...`."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from shortcut.config import EvalConfig, ModelConfig, UserError
from shortcut.costs import costs, flops_per_token
from shortcut.early_exit import compute_saved, confidence_pass, fixed_nll
from shortcut.model import GPT, Trace

V = 29
MODELS = {
    "baseline": dict(arch="baseline"),
    "shortcut": dict(arch="shortcut"),
    "shortcut-add-bias-2": dict(arch="shortcut", shortcut_mode="add", tap_bias="last", shortcut_layers=2),
    "shortcut-sparse-rope": dict(arch="shortcut", taps=[0, 2, 3], pos="rope", norm="rmsnorm", mlp="swiglu"),
}


def make(kind, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=V), **MODELS[kind], **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():  # away from the init (zero projections, tap biases), so no test passes trivially
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", MODELS)
def test_the_full_depth_exit_is_the_model(kind):
    model = make(kind)
    x = torch.randint(0, V, (2, 16))
    logits, _ = model(x)
    torch.testing.assert_close(fixed_logits(model, x, model.cfg.exit_depths()[-1]), logits, atol=1e-5, rtol=0)
    assert costs(model.cfg).exits().full == flops_per_token(model.cfg).forward


@pytest.mark.parametrize("kind", MODELS)
def test_exits_are_causal(kind):
    model = make(kind)
    x = torch.randint(0, V, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % V
    for d in model.cfg.exit_depths():
        a, b = (fixed_logits(model, t, d) for t in (x, x2))
        torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    for t in (0.3, 0.9):  # copy-up keeps causality: a token's decision reads only earlier states
        (n1, d1), (n2, d2) = (confidence_pass(model, t_, t_[:, [*range(1, 16), 0]], t) for t_ in (x, x2))
        assert torch.equal(d1[:, :9], d2[:, :9])
        torch.testing.assert_close(n1[:, :9], n2[:, :9], atol=1e-5, rtol=0)


def fixed_logits(model, x, d):
    return model.exit_logits(model.run_to(x, d), d)


@pytest.mark.parametrize("kind", MODELS)
def test_a_fixed_exit_costs_what_the_counter_counts(kind):
    """Blocks 0..d-1 and the exit head, against torch's FLOP counter (the forward, per token; MATH: attention
    counted as its two matmuls; the reference attention, one SDPA call)."""
    model = make(kind, attn_impl="masked")
    T = model.cfg.block_size
    x = torch.randint(0, V, (1, T))
    for d in model.cfg.exit_depths():
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fixed_logits(model, x, d)
        assert counter.get_total_flops() / T == pytest.approx(costs(model.cfg).exits().fixed[d], rel=1e-6), d


@pytest.mark.parametrize("kind", ["baseline", "shortcut"])
def test_threshold_one_is_the_full_model_and_zero_the_first_exit(kind):
    model = make(kind)
    x = torch.randint(0, V, (2, 16))
    y = torch.randint(0, V, (2, 16))
    logits, _ = model(x)
    nll, depth = confidence_pass(model, x, y, 1.0 + 1e-9)
    assert (depth == model.cfg.exit_depths()[-1]).all()
    torch.testing.assert_close(nll, F.cross_entropy(logits.transpose(1, 2), y, reduction="none"), atol=1e-5, rtol=0)
    nll0, depth0 = confidence_pass(model, x, y, 1e-9)
    assert (depth0 == model.cfg.exit_depths()[0]).all()
    keep = torch.ones_like(y, dtype=torch.bool)
    torch.testing.assert_close(nll0.sum(), fixed_nll(model, x, y, keep)[model.cfg.exit_depths()[0]], atol=1e-4,
                               rtol=1e-5)


def calm_reference(model, x, y, threshold):
    """Token by token, as CALM decodes: token t runs layer by layer over the states earlier tokens left at each
    depth (their exit state copied upward; the shortcut's blocks read their taps from them too) and stops at the
    first depth whose exit is confident."""
    depths = model.cfg.exit_depths()
    full, T = depths[-1], x.size(1)
    h0, _ = model.embed(x)
    S = [[None] * T for _ in range(full + 1)]  # S[j][t]: position t's state at depth j
    nll, depth = torch.zeros(T), torch.zeros(T, dtype=torch.long)
    for t in range(T):
        _, rope = model.embed(x[:, :t + 1])
        S[0][t], done = h0[:, t], False
        for d in range(1, full + 1):
            if done:
                S[d][t] = S[d - 1][t]
                continue
            states = [torch.stack([S[j][s] for s in range(t + 1)], dim=1) for j in range(d)]  # h_0..h_{d-1}
            S[d][t] = model.run_block(d - 1, Trace(states, rope))[:, -1]
            if d not in depths:
                continue
            states.append(torch.stack([S[d][s] for s in range(t + 1)], dim=1))
            logp = model.exit_logits(Trace(states, rope), d)[0, -1].log_softmax(-1)
            if logp.max().exp() >= threshold or d == full:
                nll[t], depth[t], done = -logp[y[0, t]], d, True
    return nll, depth


@torch.no_grad()
@pytest.mark.parametrize("kind", MODELS)
def test_the_confidence_policy_is_calm_with_states_copied_upward(kind):
    """The layer-synchronous pass over all positions equals CALM's token-by-token decoding with copy-up."""
    model = make(kind, n_layer=5)
    x, y = torch.randint(0, V, (1, 16)), torch.randint(0, V, (1, 16))
    conf = fixed_logits(model, x, 2).softmax(-1).max(-1).values
    threshold = float(conf.median())  # about half the tokens exit by depth 2
    nll, depth = confidence_pass(model, x, y, threshold)
    ref_nll, ref_depth = calm_reference(model, x, y, threshold)
    assert len(set(depth[0].tolist())) >= 2  # tokens exit at several depths: copies are exercised
    assert torch.equal(depth[0], ref_depth)
    torch.testing.assert_close(nll[0], ref_nll, atol=1e-5, rtol=0)


def test_copied_states_cost_their_projections_in_every_block_they_skip():
    """L=4, two shortcut blocks (block 2 reads taps 0..2, the final block 0..3), replace mode: a token exiting
    at d=1 skips block 1 (self-attention: 1 K/V), block 2 (3 taps: 3 K/V) and leaves taps 2, 3 (their feature
    maps and the final block's K/V); at d=2: block 2 (3 K/V) and tap 3. Add mode: the final block's own
    self-attention ran at the exit, so it costs nothing more; block 2's adds one."""
    for mode, extra in (("replace", 0), ("add", 1)):
        model = make("shortcut", shortcut_layers=2, shortcut_mode=mode)
        part = costs(model.cfg)
        kv, fmap = part.kv, part.feature_map
        assert part.copy_up(1) == (6 + extra) * kv + 2 * fmap
        assert part.copy_up(2) == (4 + extra) * kv + 1 * fmap
    base = make("baseline")
    assert costs(base.cfg).copy_up(1) == 3 * costs(base.cfg).kv  # blocks 1, 2, 3


def test_confidence_costs_count_decisions_and_copies():
    model = make("shortcut")
    c = costs(model.cfg).exits()
    depths = model.cfg.exit_depths()
    for d in depths[:-1]:
        assert c.confidence[d] > c.fixed[d]  # the decisions at shallower depths and the copy upward
    kv = 4 * model.cfg.n_embd ** 2  # a decision re-uses the final block's K/V of taps an earlier one projected
    part = costs(model.cfg)
    tried = part.exit(1, fmaps=False) + part.exit(2, fmaps=False) - (2 + 3) * kv
    assert depths == [1, 2, 3] and c.confidence[3] == c.full + tried  # a token that never exits pays them all


@pytest.mark.parametrize("kind", ["baseline", "shortcut"])
def test_exit_training_adds_the_exit_loss(kind):
    model = make(kind, exit_train=0.5)
    x, y = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    logits, full = model(x, y)
    d = model.cfg.exit_depths()[0]
    logits2, mixed = model(x, y, exits=(d,))
    torch.testing.assert_close(logits, logits2)
    exit_loss = F.cross_entropy(fixed_logits(model, x, d).transpose(1, 2), y)
    assert mixed.item() == pytest.approx((full.item() + exit_loss.item()) / 2, abs=1e-5)
    assert flops_per_token(model.cfg).train > flops_per_token(make(kind).cfg).train


def test_exit_training_is_refused_for_a_variant_and_bad_settings():
    with pytest.raises(ValueError, match="model.exit_train"):
        ModelConfig(arch="denseformer", exit_train=0.5)
    with pytest.raises(ValueError, match="model.exit_train"):
        ModelConfig(exit_train=1.5)
    with pytest.raises(ValueError, match="no exit depth below"):  # nothing to train: refused, not a silent no-op
        ModelConfig(arch="shortcut", n_layer=2, exit_train=0.5)
    with pytest.raises(ValueError, match="eval.exit_thresholds"):
        EvalConfig(exit="both", exit_thresholds=["a"])
    assert EvalConfig(exit_thresholds=[0.5, 0.1, 0.5]).exit_thresholds == [0.1, 0.5]
    with pytest.raises(ValueError, match="eval.exit"):
        EvalConfig(exit="sometimes")
    with pytest.raises(ValueError, match="eval.exit_thresholds"):
        EvalConfig(exit="both", exit_thresholds=[0.5, 2])


def test_the_exit_a_step_trains_is_a_function_of_seed_and_step():
    from shortcut.train import sample_exit

    cfg = ModelConfig(n_layer=6, exit_train=0.5)
    draws = [sample_exit(cfg, 0, s) for s in range(200)]
    assert draws == [sample_exit(cfg, 0, s) for s in range(200)]
    assert 60 < sum(1 for d in draws if d) < 140 and {d for (d,) in filter(None, draws)} == {1, 2, 3, 4, 5}
    assert sample_exit(ModelConfig(n_layer=6), 0, 3) == ()


def test_compute_saved_picks_the_cheapest_point_within_one_percent():
    curve = {"full": {"nll": 2.0, "flops": 100.0},
             "fixed": [{"depth": 1, "nll": 2.5, "flops": 30.0}, {"depth": 2, "nll": 2.015, "flops": 60.0},
                       {"depth": 3, "nll": 2.0, "flops": 100.0}],
             "confidence": [{"threshold": 0.5, "nll": 2.03, "flops": 50.0}, {"threshold": 0.9, "nll": 2.01,
                                                                               "flops": 80.0}]}
    s = compute_saved(curve)
    assert s["fixed"]["saved"] == pytest.approx(0.4) and s["fixed"]["at"]["depth"] == 2
    assert s["confidence"]["saved"] == pytest.approx(0.2) and s["confidence"]["at"]["threshold"] == 0.9


@pytest.mark.slow
def test_exit_trained_runs_evaluate_to_curves(tmp_path, prepared):
    """Through the commands: train with exits, eval.exit=both writes the curve, eval.json carries it, a re-run
    is up to date, another threshold list re-measures, and compare draws both models' curves."""
    from shortcut.cli import compose
    from shortcut.compare import compare
    from shortcut.evaluate import evaluate, needs_eval
    from shortcut.train import train

    runs = tmp_path / "runs"
    for arch in ("baseline", "shortcut"):  # 3 layers: the shortcut has exits at depths 1 and 2 below its full 2
        train(compose("train", prepared + TINY + [f"model={arch}", "model.n_layer=3", "model.exit_train=0.5",
                                                  "train=smoke", "train.max_steps=6"]), runs / arch)
    args = [f"run_dir={runs}", "eval.audit=false", "eval.max_tokens=300", "eval.exit=both",
            "eval.exit_thresholds=[0.2,0.6,0.9]"]
    evaluate(compose("eval", args))
    for arch in ("baseline", "shortcut"):
        curve = json.loads((runs / arch / "audit" / "exit_curve.json").read_text())
        record = json.loads((runs / arch / "eval.json").read_text())
        assert record["exit"]["fixed"] == curve["fixed"] and len(curve["confidence"]) == 3
        assert curve["fixed"][-1]["nll"] == pytest.approx(record["test_nll"], abs=1e-4)  # full depth = the eval
        assert curve["full"]["flops"] == record["flops_per_token"]
        assert (runs / arch / "audit" / "exit_curve.png").stat().st_size > 0
        assert needs_eval(runs / arch, compose("eval", args).eval) is None
        assert "early-exit" in needs_eval(runs / arch, compose("eval", args[:-1]).eval)
    summary = compare(compose("compare", [f"runs={runs}", f"results_root={tmp_path / 'res'}", "wandb=off"]))
    assert any(p.endswith("exit_curve.png") for p in summary["pictures"])
    assert any("early exit" in n for n in summary["notes"])
    evaluate(compose("eval", [f"run_dir={runs / 'shortcut'}"] + args[1:-1] + ["eval.exit_thresholds=[0.5]"]))
    with pytest.raises(UserError, match="different settings"):  # never averaged or drawn together
        compare(compose("compare", [f"runs={runs}", f"results_root={tmp_path / 'res'}", "wandb=off"]))
    evaluate(compose("eval", [f"run_dir={runs / 'shortcut'}", "eval.audit=false", "eval.max_tokens=300"]))
    assert not (runs / "shortcut" / "audit" / "exit_curve.json").exists()  # no stale curve beside a new eval
