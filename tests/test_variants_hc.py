"""Hyper-Connections (model=hyper) and mHC (model=mhc): causality, the baseline's function at initialisation, each
paper's equations against a plain loop over streams, mHC's doubly stochastic H_res and its stated start, FLOPs and
parameters against the counter, the KV cache, the commands, and the settings' one-line errors."""

import math
from dataclasses import replace

import pytest
import torch
from conftest import perturb_own, TINY, assert_causal_and_trainable, assert_flops_match_the_counter, tokens

from shortcut.config import ModelConfig
from shortcut.costs import match_params, param_counts
from shortcut.model import GPT

BASE = ModelConfig(arch="baseline", n_layer=3, n_head=2, n_embd=32, block_size=24, vocab_size=40)
MODERN = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
STYLES = [{}, {"pos": "rope"}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}, MODERN]
CASES = [("hyper", {}), ("hyper", {"hc_dynamic": False}), ("hyper", {"hc_streams": 1}),
         ("hyper", {"hc_streams": 3, "hc_dynamic": False}), ("mhc", {}), ("mhc", {"hc_dynamic": False}),
         ("mhc", {"hc_streams": 2}), ("mhc", {"hc_streams": 3, "mhc_sinkhorn_iters": 5})]
DEFAULTS = [("hyper", {}), ("mhc", {})]
# Every case in GPT-2 style; the defaults also under each modern switch (all of them for the identity).
STYLED = [(c, {}) for c in CASES] + [(c, MODERN) for c in DEFAULTS]
ALL_STYLES = [(c, {}) for c in CASES] + [(c, s) for c in DEFAULTS for s in STYLES[1:]]


def cfg_of(arch, extra=None, style=None, **kw):
    return replace(BASE, arch=arch, **(extra or {}), **(style or {}), **kw)


def name(case):
    arch, extra = case
    return arch + "".join(f"-{k}={v}" for k, v in extra.items())


def perturb(model, seed=1, scale=0.5):
    """Random values for the connections' own parameters, so no stream mix is the identity any more."""
    perturb_own(model, ("hyper", "mhc"), seed, scale)


def sublayer(block, k, h):
    """F of sublayer k (learned positions): the block's attention or MLP on its own pre-norm."""
    return block.attn(block.ln_1(h)) if k % 2 == 0 else block.mlp(block.ln_2(h))


# --- causality, the start, the counts ---

def styled_name(v):
    return name(v) if isinstance(v, tuple) else ("-".join(v.values()) or "gpt2")


@pytest.mark.parametrize("case,style", STYLED, ids=styled_name)
def test_causal_and_trainable(case, style):
    torch.manual_seed(0)
    model = GPT(cfg_of(*case, style)).eval()
    perturb(model)  # causal whatever the connections' weights, not only at their start
    assert_causal_and_trainable(model)


@pytest.mark.parametrize("case,style", ALL_STYLES, ids=styled_name)
def test_identity_at_init_is_the_baseline(case, style):
    """The baseline's weights in hyper or mhc (their own parameters at their start) give the baseline's logits:
    both start as the pre-norm residual network, mHC although its H_res is not the identity."""
    torch.manual_seed(0)
    baseline = GPT(cfg_of("baseline", style=style)).eval()
    variant = GPT(cfg_of(*case, style)).eval()
    missing, unexpected = variant.load_state_dict(baseline.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(case[0] + ".") for k in missing)
    x = tokens(B=3)
    assert (baseline(x)[0] - variant(x)[0]).abs().max().item() <= 1e-5
    states = variant.hidden_states(x)  # and every stream mean a block reads is the baseline's residual stream
    for s, b in zip(states, baseline.run_to(x, BASE.n_layer - 1).states):
        assert (s - b).abs().max().item() <= 1e-5
    perturb(variant)  # its own parameters do act once they move
    assert (baseline(x)[0] - variant(x)[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("case,style", STYLED, ids=styled_name)
def test_flops_match_the_counter(case, style):
    """Analytic forward and training FLOPs per token equal FlopCounterMode's: the width mixes and the dynamic
    projections are matmuls, and counted."""
    cfg = cfg_of(*case, style)
    model = GPT(cfg)
    perturb(model)
    assert_flops_match_the_counter(model, cfg, tokens(B=2, T=13 if style else 24))


@pytest.mark.parametrize("style", [{}, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("case", CASES, ids=name)
def test_param_counts(case, style):
    """costs.param_counts is the module's count, and the connections hold what the papers give them, per sublayer:
    HC [A_m | A_r] n(n+1), B n, dynamic also norm, W (C x (n+2)), s_α, s_β; mHC b 2n + n², dynamic also
    φ (nC x (2n + n²)) and three α."""
    cfg = cfg_of(*case, style)
    model = GPT(cfg)
    counts = param_counts(cfg)
    assert counts.params == sum(p.numel() for p in model.parameters())
    base = param_counts(replace(cfg, arch="baseline")).params
    n, C, dyn = cfg.hc_streams, cfg.n_embd, cfg.hc_dynamic
    if case[0] == "hyper":
        norm = C * (1 if cfg.norm == "rmsnorm" or not cfg.bias else 2)
        per = n * (n + 1) + n + dyn * (norm + C * (n + 2) + 2)
    else:
        per = 2 * n + n * n + dyn * (n * C * (2 * n + n * n) + 3)
    assert counts.params - base == 2 * cfg.n_layer * per


@pytest.mark.parametrize("arch", ["hyper", "mhc"])
def test_parameter_matching(arch):
    """model=baseline_matched model.match_params=hyper|mhc: a baseline grown to that parameter count."""
    size = {"n_layer": 4, "n_embd": 64, "n_head": 4, "block_size": 32}
    goal = param_counts(cfg_of(arch, **size)).params
    got = param_counts(match_params(cfg_of("baseline", match_params=arch, **size))).params
    assert got <= goal and (goal - got) / goal < 0.01, (got, goal)


# --- each paper's equations, written out stream by stream ---

def reference_hyper(model, x):
    """Section 2.1-2.2 per stream j and target i: h = sum_j A_m[j] H_j; H_i <- B[i] F(h) + sum_j A_r[j, i] H_j,
    dynamic A_m, A_r, B = s·tanh(norm(H_j) W) + static. The head reads the streams' mean."""
    hc = model.hyper
    n = hc.n
    H = [x] * n
    for k, conn in enumerate(hc.connections):
        A, Bs = conn.static_alpha.view(n, n + 1), conn.static_beta
        am = [A[j, 0] for j in range(n)]
        ar = [[A[j, 1 + i] for i in range(n)] for j in range(n)]
        beta = [Bs[j] for j in range(n)]
        if conn.dynamic:
            W = conn.proj.weight  # (n+2, C): rows W_m, W_r (n of them), W_β
            for j in range(n):
                bar = conn.norm(H[j])  # (B, T, C)
                am[j] = am[j] + conn.scale_alpha * torch.tanh(bar @ W[0])  # (B, T)
                ar[j] = [ar[j][i] + conn.scale_alpha * torch.tanh(bar @ W[1 + i]) for i in range(n)]
                beta[j] = beta[j] + conn.scale_beta * torch.tanh(bar @ W[n + 1])
        col = lambda w: w[..., None] if torch.is_tensor(w) and w.dim() > 1 else w  # noqa: E731
        h = sum(col(am[j]) * H[j] for j in range(n))
        out = sublayer(model.blocks[k // 2], k, h)
        H = [col(beta[i]) * out + sum(col(ar[j][i]) * H[j] for j in range(n)) for i in range(n)]
    return sum(H) / n


def sinkhorn_by_scalings(logits, iters):
    """Sinkhorn-Knopp as its scaling vectors: M = exp(logits), c = 1 / (Mᵀ r), r = 1 / (M c); diag(r) M diag(c)."""
    M = logits.double().exp()  # (..., n, n)
    r = torch.ones(M.shape[:-1], dtype=M.dtype)
    for _ in range(iters):
        c = 1 / (M * r[..., :, None]).sum(-2)  # column sums of diag(r) M
        r = 1 / (M * c[..., None, :]).sum(-1)  # row sums of M diag(c)
    return r[..., :, None] * M * c[..., None, :]


def reference_mhc(model, x):
    """Section 4.2 per position: x̃ = RMSNorm(vec(x_l)), H̃ = α·(x̃ φ) + b, H_pre = σ, H_post = 2σ, H_res = SK; then
    x_{l+1}[i] = sum_j H_res[i, j] x_l[j] + H_post[i] F(sum_j H_pre[j] x_l[j])."""
    m = model.mhc
    n = m.n
    H = [x] * n
    for k, conn in enumerate(m.connections):
        pre, post, res = conn.b_pre, conn.b_post, conn.b_res.view(n, n)
        if conn.dynamic:
            v = torch.cat(H, dim=-1)  # vec(x_l) (B, T, nC): stream after stream
            xt = v / (v.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
            phi = conn.phi.weight.T  # (nC, 2n + n²)
            pre = conn.alpha[0] * (xt @ phi[:, :n]) + pre
            post = conn.alpha[1] * (xt @ phi[:, n:2 * n]) + post
            res = conn.alpha[2] * (xt @ phi[:, 2 * n:]).unflatten(-1, (n, n)) + res
        pre, post = torch.sigmoid(pre), 2 * torch.sigmoid(post)
        res = sinkhorn_by_scalings(res, conn.iters).float()
        h = sum(pre[..., j, None] * H[j] for j in range(n))
        out = sublayer(model.blocks[k // 2], k, h)
        H = [post[..., i, None] * out + sum(res[..., i, j, None] * H[j] for j in range(n)) for i in range(n)]
    return sum(H) / n


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "hyper"], ids=name)
def test_hyper_is_its_equations(case):
    torch.manual_seed(0)
    model = GPT(cfg_of(*case)).eval()
    perturb(model)
    x = tokens()
    h, _ = model.embed(x)
    torch.testing.assert_close(model(x)[0], model.lm_head(model.ln_f(reference_hyper(model, h))))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "mhc"], ids=name)
def test_mhc_is_its_equations(case):
    torch.manual_seed(0)
    model = GPT(cfg_of(*case)).eval()
    perturb(model)
    x = tokens()
    h, _ = model.embed(x)
    torch.testing.assert_close(model(x)[0], model.lm_head(model.ln_f(reference_mhc(model, h))))


def test_mhc_h_res_is_doubly_stochastic_after_its_iterations():
    """After model.mhc_sinkhorn_iters = 20 iterations, with weights moved so that H_res varies by ~0.1 from position
    to position: every H_res is non-negative, its rows and columns sum to 1 within 1e-4. One iteration leaves the
    columns off. (Far larger logits need more iterations: the next test.)"""
    torch.manual_seed(0)
    for iters, close in ((20, True), (1, False)):
        model = GPT(cfg_of("mhc", mhc_sinkhorn_iters=iters)).eval()
        perturb(model, scale=0.15)
        H = torch.randn(2, 24, 4, 32)
        worst, spread = 0.0, 0.0
        for conn in model.mhc.connections:
            _, _, res = conn.coefficients(H)  # (B, T, n, n)
            assert res.shape == (2, 24, 4, 4) and (res >= 0).all()
            spread = max(spread, res.std(dim=(0, 1)).max().item())
            worst = max(worst, (res.sum(-1) - 1).abs().max().item(), (res.sum(-2) - 1).abs().max().item())
        assert spread > 0.05  # per position, not one matrix
        assert (worst <= 1e-4) == close, (iters, worst)


def test_twenty_iterations_reach_1e4_only_for_moderate_logits():
    """What docs/models.md states of SK's convergence (n = 4, 10,000 draws of H̃_res ~ N(0, s²) per entry): s = 0.5,
    every one within 1e-4 after 20 iterations; s = 2, over 1% of them more than 1e-3 off (200 iterations: 1e-4 for
    99%). The rows are exact either way: the last scaling is theirs."""
    from shortcut.variants.mhc import sinkhorn

    g = torch.Generator().manual_seed(0)
    col_error = lambda m: (m.sum(-2) - 1).abs().amax(-1)  # noqa: E731
    small, large = torch.randn(10_000, 4, 4, generator=g) * 0.5, torch.randn(10_000, 4, 4, generator=g) * 2
    assert col_error(sinkhorn(small, 20)).max() <= 1e-4
    assert (col_error(sinkhorn(large, 20)) > 1e-3).float().mean() > 0.01
    assert col_error(sinkhorn(large, 200)).quantile(0.99) <= 1e-4
    assert (sinkhorn(large, 20).sum(-1) - 1).abs().max() <= 1e-5


@pytest.mark.parametrize("n", [2, 4])
def test_mhc_starts_where_its_docstring_says(n):
    """At initialisation every H is the same at every position: H_res = ((e-1)·I + J) / (e+n-1), not the identity;
    H_pre = 3/4 on stream k mod n and 1/(4(n-1)) elsewhere; H_post = 1."""
    model = GPT(cfg_of("mhc", hc_streams=n))
    H = torch.randn(2, 5, n, 32)
    expected = ((math.e - 1) * torch.eye(n) + torch.ones(n, n)) / (math.e + n - 1)
    assert (expected - torch.eye(n)).abs().max() > 0.1
    for k, conn in enumerate(model.mhc.connections):
        pre, post, res = conn.coefficients(H)
        torch.testing.assert_close(res, expected.expand(2, 5, n, n))
        read = torch.full((n,), 0.25 / (n - 1))
        read[k % n] = 0.75
        torch.testing.assert_close(pre, read.expand(2, 5, n))
        torch.testing.assert_close(post, torch.ones(2, 5, n))


def test_hyper_starts_at_the_papers_hc_matrices():
    """Section 2.3: sublayer k reads stream k mod n (A_m = e_{k mod n}), A_r = I, B = 1, dynamic parts 0."""
    model = GPT(cfg_of("hyper"))
    H = torch.randn(2, 5, 4, 32)
    for k, conn in enumerate(model.hyper.connections):
        mix, post = conn(H)
        expected = torch.cat([torch.eye(4)[k % 4][None], torch.eye(4)])  # (n+1, n): A_mᵀ, then A_rᵀ
        torch.testing.assert_close(mix, expected.expand(2, 5, 5, 4))
        torch.testing.assert_close(post, torch.ones(2, 5, 4))


# --- decoding ---

@pytest.mark.parametrize("arch,extra", [("hyper", {}), ("hyper", {**MODERN, "hc_dynamic": False}),
                                        ("mhc", {**MODERN, "hc_streams": 3})], ids=str)
def test_cached_logits_equal_a_full_forward_at_every_step(arch, extra):
    """The connections act per position, so the KV cache composes: cached decoding gives a full forward's logits,
    past block_size too (the window rebuilt from its last half)."""
    from shortcut.generate import FullForward, KVCacheDecoder, supports_cache

    torch.manual_seed(0)
    model = GPT(ModelConfig(arch=arch, n_layer=3, n_head=2, n_embd=32, block_size=12, vocab_size=40, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    assert supports_cache(model)
    decoder, uncached = KVCacheDecoder(model), FullForward(model)
    prompt = torch.randint(0, 40, (2, 5))
    logits, full = decoder.start(prompt), uncached.start(prompt)
    lengths = []
    for _ in range(14):
        with torch.no_grad():
            reference = model(decoder.seq)[0][:, -1]
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
        lengths.append(decoder.seq.size(1))
        ids = torch.randint(0, 40, (2,))
        logits, full = decoder.push(ids), uncached.push(ids)
    assert max(lengths) == 12 and min(lengths[8:]) == 6  # full windows, and rebuilt from block_size // 2


def test_no_early_exits_for_the_streams():
    """Exit and speculative decoding read one residual stream at a depth: refused in one line (and the
    evaluation's decoding speeds measure plain cached decoding only)."""
    from shortcut.generate import ExitDecoder, SpeculativeDecoder

    model = GPT(cfg_of("hyper")).eval()
    with pytest.raises(ValueError, match="no early exits for this hyper model"):
        ExitDecoder(model, 0.9)
    with pytest.raises(ValueError, match="speculative decoding drafts"):
        SpeculativeDecoder(model, 1, 4)
    from shortcut.adaptive import draft_depth
    from shortcut.config import EvalConfig

    assert draft_depth(model, EvalConfig(decode_tokens=8)) is None  # eval.decode_tokens: plain decoding only


# --- settings ---

@pytest.mark.parametrize("bad,key", [({"hc_streams": 0}, "hc_streams"),
                                     ({"arch": "mhc", "hc_streams": 1}, "hc_streams"),
                                     ({"arch": "mhc", "mhc_sinkhorn_iters": 0}, "mhc_sinkhorn_iters"),
                                     ({"arch": "hyper", "exit_train": 0.5}, "exit_train"),
                                     ({"arch": "mhc", "mod_capacity": 0.5}, "mod_capacity")])
def test_bad_settings_name_the_key(bad, key):
    with pytest.raises(ValueError, match=f"model.{key}") as info:
        replace(BASE, **bad)
    assert "\n" not in str(info.value)


def test_the_model_configs_compose():
    from shortcut.cli import compose

    hyper = compose("train", ["model=hyper"]).model
    mhc = compose("train", ["model=mhc", "model.hc_streams=2", "model.hc_dynamic=false"]).model
    assert (hyper.arch, hyper.hc_streams, hyper.hc_dynamic) == ("hyper", 4, True)
    assert (mhc.arch, mhc.hc_streams, mhc.hc_dynamic, mhc.mhc_sinkhorn_iters) == ("mhc", 2, False, 20)


# --- through the commands ---

def _train_eval_sample(tmp_path, prepared, model, *extra):
    import json

    from shortcut.cli import compose
    from shortcut.evaluate import evaluate
    from shortcut.sample import sample
    from shortcut.train import train

    run = tmp_path / model
    summary = train(compose("train", prepared + TINY + [f"model={model}", "train=smoke", "train.max_steps=4",
                                                        *extra]), run)
    assert math.isfinite(summary.final_val_loss)
    evaluate(compose("eval", [f"run_dir={run}", "eval.audit_sequences=2", "eval.max_tokens=256"]))
    depth = json.loads((run / "audit" / "depth.json").read_text())
    assert len(depth["logit_lens_nll"]) == 3 and not depth.get("layer_weights")  # streams, not layer weights
    record = sample(compose("sample", [f"run_dir={run}", "sample.n=2", "sample.max_new_tokens=20",
                                       "sample.prompt='The '"]))
    assert record["cache"] is True and len(record["samples"]) == 2


def test_hyper_trains_evaluates_and_samples_with_the_cache(tmp_path, prepared):
    _train_eval_sample(tmp_path, prepared, "hyper", "model.pos=rope")


@pytest.mark.slow
def test_mhc_trains_evaluates_and_samples_with_the_cache(tmp_path, prepared):
    _train_eval_sample(tmp_path, prepared, "mhc", "model.norm=rmsnorm", "model.mlp=swiglu")
