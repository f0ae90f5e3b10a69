"""The shortcut's relatives (shortcut/variants/) and the modern baseline switches: causality, the identity at
initialisation where the paper starts there, FLOPs and parameters against the counter, matching, each paper's
equation against a plain re-statement, the generalised depth audit."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_causal_and_trainable, assert_flops_match_the_counter, tokens

from shortcut.audit import summarise_layer_weights
from shortcut.config import ModelConfig, TrainConfig
from shortcut.costs import flops_per_token, match_params, param_counts
from shortcut.model import GPT

BASE = ModelConfig(arch="baseline", n_layer=3, n_head=2, n_embd=32, block_size=24, vocab_size=40)
ARCHS = ["baseline", "shortcut", "denseformer", "connect_last", "attnres", "mudd", "value_residual"]
MODERN = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
STYLES = [{}, {"pos": "rope"}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}, MODERN]
# Each arch's own switches, beyond its defaults.
EXTRAS = [("denseformer", {"dwa_dilation": 2}), ("denseformer", {"dwa_period": 2}),
          ("denseformer", {"dwa_dilation": 2, "dwa_period": 3}), ("attnres", {"attnres_block": 2}),
          ("attnres", {"attnres_block": 3}), ("attnres", {"attnres_block": 6}),
          ("value_residual", {"value_residual_init": 0.0}),
          ("mudd", {"bias": False}), ("shortcut", {"taps": [0, 2], "feature_map": "linear"})]
ALL = [(a, {}) for a in ARCHS] + EXTRAS
# Settings that compute exactly the baseline's function at initialisation (the paper starts there).
IDENTITY = [("shortcut", {"taps": [2], "feature_map": "none", "depth_embedding": False}), ("denseformer", {}),
            ("denseformer", {"dwa_dilation": 2, "dwa_period": 2}), ("connect_last", {}), ("mudd", {}),
            ("value_residual", {"value_residual_init": 0.0})]


def cfg_of(arch, extra=None, style=None, **kw):
    return replace(BASE, arch=arch, **(extra or {}), **(style or {}), **kw)


def name(case):
    arch, extra = case[:2]
    return arch + "".join(f"-{k}={v}" for k, v in extra.items())


def perturb(model, seed=1):
    """Random values for the variant's own parameters, so its mixing is no longer the identity or an average."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.split(".")[0] in ("denseformer", "connect_last", "attnres", "mudd", "value_residual"):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


# --- causality and training ---

@pytest.mark.parametrize("style", [{}, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("case", ALL, ids=name)
def test_causal_and_trainable(case, style):
    torch.manual_seed(0)
    model = GPT(cfg_of(*case, style)).eval()
    perturb(model)  # the mixing must be causal whatever its weights, not only at the identity
    assert_causal_and_trainable(model)


@pytest.mark.parametrize("style", STYLES, ids=lambda s: "-".join(s.values()) or "gpt2")
@pytest.mark.parametrize("case", IDENTITY, ids=name)
def test_identity_at_init_is_the_baseline(case, style):
    """The baseline's weights loaded into the variant (its own parameters at their initial values) give the
    baseline's logits: the variant starts as the baseline, under every pos/norm/mlp choice."""
    torch.manual_seed(0)
    baseline = GPT(cfg_of("baseline", style=style)).eval()
    variant = GPT(cfg_of(*case, style)).eval()
    missing, unexpected = variant.load_state_dict(baseline.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(case[0]) for k in missing)  # the baseline's names, plus its own
    x = tokens(B=3)
    assert (baseline(x)[0] - variant(x)[0]).abs().max().item() <= 1e-5
    if case[0] != "shortcut":  # and its own parameters do act once they move
        perturb(variant)
        assert (baseline(x)[0] - variant(x)[0]).abs().max().item() > 1e-3


def test_defaults_keep_todays_parameter_names():
    """Existing checkpoints load: the default baseline and shortcut have exactly today's state-dict keys."""
    names = set(GPT(BASE).state_dict())
    assert "wpe.weight" in names and "blocks.0.mlp.c_fc.weight" in names and "blocks.0.ln_1.bias" in names
    assert not any(k.startswith(("rotary", "denseformer", "mudd")) for k in names)
    assert set(GPT(cfg_of("shortcut")).state_dict()) - names == {
        *(f"feature_maps.{i}.{p}" for i in range(3) for p in
          ("ln.weight", "ln.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")),
        "depth_emb"}
    rope = set(GPT(cfg_of("baseline", style={"pos": "rope"})).state_dict())
    assert rope == names - {"wpe.weight"}  # the rotary tables are buffers outside the state dict


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_one_step_smoke(pos, norm, mlp):
    """Every arch x pos x norm x mlp: one AdamW step (decay on matrices only) lowers the loss on its batch."""
    for arch in ARCHS:
        torch.manual_seed(0)
        model = GPT(cfg_of(arch, style={"pos": pos, "norm": norm, "mlp": mlp}, dropout=0.1))
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-3)
        x = tokens(B=2, T=16)
        model.eval()
        with torch.no_grad():
            before = model(x, x)[1].item()
        model.train()
        model(x, x)[1].backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            after = model(x, x)[1].item()
        assert math.isfinite(after) and after < before, arch


# --- counts: exact against torch's counter ---

@pytest.mark.parametrize("style,T", [({}, 24), (MODERN, 13)], ids=["gpt2-T24", "modern-T13"])
@pytest.mark.parametrize("case", ALL, ids=name)
def test_flops_match_the_counter(case, style, T):
    """Analytic forward and training FLOPs per token equal FlopCounterMode's (MATH backend), relative error <= 1e-6."""
    cfg = cfg_of(*case, style)
    model = GPT(replace(cfg, attn_impl="masked"))
    perturb(model)
    x = tokens(B=2, T=T)
    assert_flops_match_the_counter(model, cfg, x)


@pytest.mark.parametrize("style", [{}, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("case", ALL, ids=name)
def test_param_counts(case, style):
    cfg = cfg_of(*case, style)
    model = GPT(cfg)
    counts = param_counts(cfg)
    assert counts.params == sum(p.numel() for p in model.parameters())
    tables = 40 * 32 + (24 * 32 if cfg.pos == "learned" else 0)
    assert counts.non_embedding_params == counts.params - tables


def test_swiglu_keeps_the_mlp_parameters():
    gelu, swiglu = param_counts(BASE).params, param_counts(replace(BASE, mlp="swiglu")).params
    assert abs(swiglu - gelu) / gelu < 0.01


@pytest.mark.parametrize("target,by,style", [(a, "width", {}) for a in ARCHS if a != "baseline"]
                         + [("mudd", "depth", {}), ("attnres", "width", MODERN), ("shortcut", "depth", MODERN)],
                         ids=lambda v: v if isinstance(v, str) else ("modern" if v else "gpt2"))
def test_parameter_matching_against_any_variant(target, by, style):
    """model=baseline_matched model.match_params=<arch>: a baseline grown to that arch's parameter count."""
    size = dict(n_layer=4, n_embd=64, n_head=4, block_size=32)
    goal = param_counts(cfg_of(target, style=style, **size)).params
    matched = match_params(cfg_of("baseline", style=style, match_params=target, match_by=by, **size))
    assert matched.arch == "baseline" and matched.match_params is None
    got = param_counts(matched).params
    assert got <= goal and (goal - got) / goal < 0.01, (got, goal)
    GPT(matched)(tokens(T=16))  # and it runs


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "baseline"])
def test_compute_matching_against_any_variant(arch):
    """train.match_flops=<arch>: this model trains for that arch's FLOPs (and the reverse)."""
    from shortcut.train import Match, effective_train

    cfg = TrainConfig(max_steps=100, batch_size=4, match_flops=arch)
    base = replace(BASE, vocab_size=None)
    mine = effective_train(cfg, replace(BASE), 40, Match(replace(base, arch=arch), 100))
    ratio = flops_per_token(cfg_of(arch)).train / flops_per_token(BASE).train
    assert mine.max_steps == int(100 * ratio)
    theirs = effective_train(replace(cfg, match_flops="baseline"), cfg_of(arch), 40, Match(base, 100))
    assert theirs.max_steps == int(100 / ratio + 1e-9)


@pytest.mark.parametrize("bad", [{"dwa_dilation": 0}, {"dwa_period": 0}, {"dwa_period": 4}, {"attnres_block": 0},
                                 {"value_residual_init": 1.5}, {"pos": "alibi"}, {"norm": "batchnorm"},
                                 {"mlp": "relu"}, {"arch": "densenet"}, {"pos": "rope", "n_embd": 30, "n_head": 10},
                                 {"match_params": "baseline"}])
def test_bad_settings_name_the_key(bad):
    key = next(iter(bad)) if "n_embd" not in bad else "pos"
    with pytest.raises(ValueError, match=f"model.{key}"):
        replace(BASE, **bad)


# --- each paper's equation, re-stated plainly ---

def test_denseformer_sources_follow_dilation_and_period():
    """Section 4: with dilation k the DWA after block i reads X_j for j <= i, (i - j) % k == 0; with period p,
    a DWA follows blocks p, 2p, ... only."""
    from shortcut.variants.denseformer import DenseFormer

    dwa = DenseFormer(replace(BASE, n_layer=6, dwa_dilation=2, dwa_period=3))
    assert dwa.after == [3, 6] and dwa.sources == {3: [1, 3], 6: [0, 2, 4, 6]}
    last = GPT(cfg_of("connect_last", n_layer=6)).connect_last
    assert last.after == [6] and last.sources == {6: list(range(7))}


def test_denseformer_computes_its_weighted_averages():
    torch.manual_seed(0)
    model = GPT(cfg_of("denseformer", {"dwa_dilation": 2})).eval()
    perturb(model)
    x = tokens()
    h, _ = model.embed(x)
    outs, alphas = [h], model.denseformer.alphas
    for i, block in enumerate(model.blocks, start=1):  # Y_i = sum_j alpha_ij X_j over j = i, i-2, ...
        outs.append(block(h)[0])
        h = sum(a * outs[j] for a, j in zip(alphas[i - 1], range(i % 2, i + 1, 2)))
    torch.testing.assert_close(model(x)[0], model.lm_head(model.ln_f(h)))


def reference_attnres(model, x, S):
    """Eq. (2)-(6) written out: sublayer l's input attends over [b_0 .. b_{n-1}] (+ the partial sum b_n^{i-1} past
    the block's first sublayer) with alpha = softmax(w_l . RMSNorm_l(v)); the head reads all blocks."""
    v = model.attnres
    subs = [(b, s) for b in range(len(model.blocks)) for s in range(2)]
    blocks, partial, mix = [x], None, 0
    for n, (b, s) in enumerate(subs):
        if n == 0:
            h = x
        else:
            vals = blocks + ([partial] if partial is not None else [])
            logits = torch.stack([F.rms_norm(u, (u.size(-1),), weight=v.gains[mix], eps=1e-6) @ v.queries[mix]
                                  for u in vals], -1)
            h = sum(a.unsqueeze(-1) * u for a, u in zip(logits.softmax(-1).unbind(-1), vals))
            mix += 1
        block = model.blocks[b]
        out = block.attn(block.ln_1(h)) if s == 0 else block.mlp(block.ln_2(h))
        partial = out if partial is None else partial + out
        if (n + 1) % S == 0:
            blocks, partial = blocks + [partial], None
    vals = blocks + ([partial] if partial is not None else [])
    logits = torch.stack([F.rms_norm(u, (u.size(-1),), weight=v.gains[mix], eps=1e-6) @ v.queries[mix]
                          for u in vals], -1)
    return sum(a.unsqueeze(-1) * u for a, u in zip(logits.softmax(-1).unbind(-1), vals))


@pytest.mark.parametrize("S", [None, 2, 3, 6])
def test_attnres_is_its_equations(S):
    torch.manual_seed(0)
    model = GPT(cfg_of("attnres", {"attnres_block": S})).eval()
    perturb(model)
    x = tokens()
    h, _ = model.embed(x)
    torch.testing.assert_close(model(x)[0], model.lm_head(model.ln_f(reference_attnres(model, h, S or 1))))


def test_attnres_starts_as_an_average():
    """Section 5: zero pseudo-queries, so every mix is the plain mean of its sources."""
    model = GPT(cfg_of("attnres", n_layer=1)).eval()
    x = tokens()
    h, _ = model.embed(x)
    b = model.blocks[0]
    a = b.attn(b.ln_1(h))
    m = b.mlp(b.ln_2((h + a) / 2))
    torch.testing.assert_close(model(x)[0], model.lm_head(model.ln_f((h + a + m) / 3)))


def test_mudd_computes_its_four_streams():
    """Section 3: after block i, X^s = sum_j A^s[j] X_j with A = GELU(RMSNorm(X_i) W1) W2 + a per position; block
    i+1 takes q, k, v from X^Q, X^K, X^V (own norms) and adds to X^R; only R after the last block."""
    torch.manual_seed(0)
    model = GPT(cfg_of("mudd")).eval()
    perturb(model)
    mudd, x = model.mudd, tokens()
    h, _ = model.embed(x)
    outs, streams = [h], [h] * 4
    for i, block in enumerate(model.blocks):
        xq, xk, xv, xr = streams
        norms = (block.ln_1, block.ln_1, block.ln_1) if i == 0 else (block.ln_1, mudd.ln_k[i - 1], mudd.ln_v[i - 1])
        q, k, v = (block.attn.heads(n(u) @ w.T + bb) for n, u, w, bb in
                   zip(norms, (xq, xk, xv), block.attn.c_attn.weight.split(32), block.attn.c_attn.bias.split(32)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 24, 32)
        hh = xr + block.attn.c_proj(y)
        outs.append(hh + block.mlp(block.ln_2(hh)))
        g = mudd.gen[i]
        A = (F.gelu(F.rms_norm(outs[-1], (32,), eps=1e-6) @ g.w1.weight.T) @ g.w2.weight.T + g.static)
        A = A.view(2, 24, -1, i + 2)
        streams = [sum(A[..., s, j:j + 1] * outs[j] for j in range(i + 2)) for s in range(A.size(2))]
    torch.testing.assert_close(model(x)[0], model.lm_head(model.ln_f(streams[0])))


def test_value_residual_mixes_the_first_layers_values():
    """U_n = A_n (lambda_1 V_n + lambda_2 V_1) for n >= 2; layer 1 unchanged."""
    torch.manual_seed(0)
    model = GPT(cfg_of("value_residual")).eval()
    perturb(model)
    x = tokens()
    h, _ = model.embed(x)
    v1 = None
    for n, block in enumerate(model.blocks):
        q, k, v = (block.attn.heads(t) for t in block.attn.c_attn(block.ln_1(h)).split(32, dim=-1))
        v1 = v if v1 is None else v1
        if n > 0:
            lam = model.value_residual.lambdas[n - 1]
            v = lam[0] * v + lam[1] * v1
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 24, 32)
        h = h + block.attn.c_proj(y)
        h = h + block.mlp(block.ln_2(h))
    torch.testing.assert_close(model(x)[0], model.lm_head(model.ln_f(h)))


def test_rope_depends_on_relative_position_only():
    from shortcut.blocks import Rotary, apply_rope

    rope = Rotary(8, 32)
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = rope(32)
    # float(): pytest.approx over a 0-d tensor fails from pytest 9.2 on ("iteration over a 0-d tensor", issue 19)
    score = lambda t, s: float(apply_rope(q, (cos[t], sin[t])) @ apply_rope(k, (cos[s], sin[s])))  # noqa: E731
    assert score(9, 4) == pytest.approx(score(25, 20), abs=1e-5) and score(9, 4) != pytest.approx(score(9, 5))


# --- the generalised depth audit ---

@pytest.mark.parametrize("case", ALL, ids=name)
def test_layer_weights(case):
    cfg = cfg_of(*case)
    model = GPT(cfg).eval()
    perturb(model)
    x = tokens()
    with torch.no_grad():
        lw = model.layer_weights(x)
        states = model.hidden_states(x)
    assert len(states) == cfg.n_layer and all(s.shape == (2, 24, 32) for s in states)
    if case[0] in ("baseline", "value_residual"):
        assert lw is None and not model.weighs_layers
        return
    w = lw["weights"]
    assert w.shape == (2, 24, len(lw["consumers"]), len(lw["sources"]))
    assert lw["consumers"][-1] in ("head", "final block")
    if lw["normalised"]:
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert (w >= 0).all()
    summary = summarise_layer_weights(w, {k: v for k, v in lw.items() if k != "weights"})
    assert len(summary["mean"]) == len(summary["sources"]) and len(summary["matrix"]) == len(summary["consumers"])
    if case[0] in ("denseformer", "connect_last"):  # static weights: the same for every token
        assert max(summary["token_std"]) < 1e-6


def test_layer_weights_at_init_are_each_papers_start():
    x = tokens()
    for arch in ("denseformer", "connect_last", "mudd"):  # one-hot on the newest output
        lw = GPT(cfg_of(arch)).eval().layer_weights(x)
        torch.testing.assert_close(lw["weights"][:, :, -1], torch.tensor([0.0, 0, 0, 1]).expand(2, 24, 4))
    lw = GPT(cfg_of("attnres")).eval().layer_weights(x)  # the head: mean of emb + 3 x (attn, mlp) outputs
    torch.testing.assert_close(lw["weights"][:, :, -1], torch.tensor([1 / 7, 2 / 7, 2 / 7, 2 / 7]).expand(2, 24, 4))


# --- through the commands: train, eval (audit), compare ---

def _train_eval(tmp_path, prepared, model, *extra):
    import json

    from conftest import TINY

    from shortcut.cli import compose
    from shortcut.evaluate import evaluate
    from shortcut.train import train

    run = tmp_path / model
    train(compose("train", prepared + TINY + [f"model={model}", "train=smoke", "train.max_steps=4", *extra]), run)
    evaluate(compose("eval", [f"run_dir={run}", "eval.audit_sequences=2", "eval.max_tokens=256"]))
    return run, json.loads((run / "audit" / "depth.json").read_text())


def test_a_variant_trains_evaluates_and_reports_its_layer_weights(tmp_path, prepared):
    run, depth = _train_eval(tmp_path, prepared, "mudd", "model.pos=rope")
    lw = depth["layer_weights"]
    assert lw["kind"] == "mudd dynamic weights" and lw["sources"] == [0, 1, 2] and len(lw["mean"]) == 3
    assert lw["consumers"][-1] == "head" and len(lw["matrix"]) == len(lw["consumers"]) == 5
    assert (run / "audit" / "layer_weights.png").stat().st_size > 5000
    assert len(depth["logit_lens_nll"]) == 3


@pytest.mark.slow
def test_every_variant_through_train_eval_and_one_compare_table(tmp_path, prepared):
    from shortcut.cli import compose
    from shortcut.compare import compare

    kinds = {}
    for model in ["baseline", "baseline_matched", "shortcut", "denseformer", "connect_last", "attnres", "mudd",
                  "value_residual"]:
        _, depth = _train_eval(tmp_path / "runs", prepared, model)
        kinds[model] = (depth.get("layer_weights") or {}).get("kind")
    assert kinds == {"baseline": None, "baseline_matched": None, "shortcut": "shortcut attention mass",
                     "denseformer": "dwa coefficients", "connect_last": "dwa coefficients",
                     "attnres": "attnres softmax", "mudd": "mudd dynamic weights", "value_residual": None}
    summary = compare(compose("compare", [f"runs={tmp_path / 'runs'}", f"results_root={tmp_path / 'results'}",
                                          "wandb=off"]))
    # one row each (called from Python, train labels a row by its arch: the two baselines differ by their hash)
    assert len(summary["rows"]) == len(kinds)
    assert sorted(r["arch"] for r in summary["rows"]) == sorted(k.replace("_matched", "") for k in kinds)
