"""MoDA (mixture-of-depths attention) and LAuReL (learned augmented residuals): causality with moved parameters,
each paper's equation against a plain loop, the stated initialisation, parameters and FLOPs against the counter,
cached decoding against a full forward, the settings they refuse, and a tiny train + eval through the commands."""

import math
from dataclasses import replace

import pytest
import torch
from conftest import perturb_own, assert_causal_and_trainable, assert_flops_match_the_counter, tokens

from shortcut.blocks import apply_rope
from shortcut.config import ModelConfig, SampleConfig, UserError
from shortcut.costs import flops_per_token, param_counts
from shortcut.generate import ExitDecoder, FullForward, KVCacheDecoder, generate, supports_cache
from shortcut.model import GPT

BASE = ModelConfig(arch="baseline", n_layer=3, n_head=2, n_embd=32, block_size=24, vocab_size=40)
MODERN = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
MODA = [("moda", {}), ("moda", {"moda_ffn_kv": False}), ("moda", {"bias": False})]
LAUREL = [("laurel", {"laurel": m}) for m in ("rw", "lr", "pa")] + [("laurel", {"laurel": "pa", "laurel_rank": 3})]
ALL = MODA + LAUREL


def cfg_of(arch, extra=None, style=None, **kw):
    return replace(BASE, arch=arch, **(extra or {}), **(style or {}), **kw)


def name(case):
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


def perturb(model, seed=1, scale=0.5):
    """Random values for the variant's own parameters (moda.*, laurel.*): away from B = 0, alpha = beta = 1."""
    perturb_own(model, ("moda", "laurel"), seed, scale)


@pytest.mark.parametrize("style", [{}, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("case", ALL, ids=name)
def test_causal_and_trainable(case, style):
    """Causal in sequence and depth whatever the weights: a depth slot is the query's own position only."""
    torch.manual_seed(0)
    model = GPT(cfg_of(*case, style)).eval()
    perturb(model)
    assert_causal_and_trainable(model)


@pytest.mark.parametrize("style,T", [({}, 24), (MODERN, 13)], ids=["gpt2-T24", "modern-T13"])
@pytest.mark.parametrize("case", ALL, ids=name)
def test_flops_match_the_counter(case, style, T):
    cfg = cfg_of(*case, style)
    model = GPT(cfg)
    perturb(model)
    assert_flops_match_the_counter(model, cfg, tokens(B=2, T=T))


@pytest.mark.parametrize("style", [{}, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("case", ALL, ids=name)
def test_parameters_are_the_stated_count(case, style):
    """MoDA: one C -> 2C KV projection (bias per model.bias) per FFN but the last's. LAuReL: alpha and beta per
    residual connection (2L), B·A of rank r per connection (lr) or per connection but the first (pa), gamma_ij for
    j < i (pa)."""
    cfg = cfg_of(*case, style)
    C, L, r, n = cfg.n_embd, cfg.n_layer, cfg.laurel_rank, 2 * cfg.n_layer
    extra = {"moda": (L - 1) * (2 * C * C + 2 * C * cfg.bias) * cfg.moda_ffn_kv,
             "laurel": 2 * n + {"rw": 0, "lr": n * 2 * C * r, "pa": (n - 1) * 2 * C * r + n * (n - 1) // 2}
             .get(str(cfg.laurel), 0)}[case[0]]
    baseline = param_counts(replace(cfg, arch="baseline")).params
    assert param_counts(cfg).params == sum(p.numel() for p in GPT(cfg).parameters()) == baseline + extra


def test_the_overheads_stated_in_the_docs():
    """docs/models.md states MoDA's and LAuReL's FLOP and parameter overheads at two sizes: keep them true."""
    def overhead(size, **kw):
        cfg, base = ModelConfig(**size, **kw), ModelConfig(**size)
        return (round(100 * (flops_per_token(cfg).forward / flops_per_token(base).forward - 1), 1),
                round(100 * (param_counts(cfg).params / param_counts(base).params - 1), 1))
    small = dict(n_layer=12, n_head=4, n_embd=64, block_size=128, vocab_size=100)
    gpt2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    assert overhead(small, arch="moda") == (13.5, 14.9) and overhead(gpt2, arch="moda") == (9.3, 10.4)
    assert overhead(small, arch="moda", moda_ffn_kv=False) == (1.1, 0.0)
    assert overhead(gpt2, arch="moda", moda_ffn_kv=False) == (0.1, 0.0)
    assert overhead(small, arch="laurel") == (1.5, 2.0) and overhead(gpt2, arch="laurel") == (0.1, 0.1)


# --- the equations, re-stated as plain loops ---

def reference_moda(model, idx):
    """Section 2.2 written out token by token: query t of block l scores its block's keys k_s, s <= t, and the
    depth keys every earlier block wrote at position t (its attention's k_t, and W_kv·LN_2 of its FFN input), one
    softmax over all of them, and sums their values."""
    cfg, C = model.cfg, model.cfg.n_embd
    h, rope = model.embed(idx)
    B, T, _ = h.shape
    depth = []  # per slot: (key, value), each (B, nh, T, hs)
    for l, block in enumerate(model.blocks):
        q, k, v = block.attn.project(block.ln_1(h), rope=rope)
        y = torch.zeros_like(q)
        for b in range(B):
            for hd in range(cfg.n_head):
                for t in range(T):
                    keys = [k[b, hd, s] for s in range(t + 1)] + [dk[b, hd, t] for dk, _ in depth]
                    vals = [v[b, hd, s] for s in range(t + 1)] + [dv[b, hd, t] for _, dv in depth]
                    w = torch.stack([q[b, hd, t] @ kk / math.sqrt(q.size(-1)) for kk in keys]).softmax(0)
                    y[b, hd, t] = sum(wi * vv for wi, vv in zip(w, vals))
        h = h + block.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        depth.append((k, v))
        m = block.ln_2(h)
        if cfg.moda_ffn_kv and l < cfg.n_layer - 1:
            kf, vf = (block.attn.heads(t) for t in model.moda.ffn_kv[l](m).split(C, -1))
            depth.append((apply_rope(kf, rope) if rope is not None else kf, vf))
        h = h + block.mlp(m)
    return model.head(h)


@pytest.mark.parametrize("style", [{}, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("case", MODA[:2], ids=name)
def test_moda_is_its_equation(case, style):
    torch.manual_seed(0)
    model = GPT(cfg_of(*case, style)).eval()
    perturb(model)
    x = tokens(T=9)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], reference_moda(model, x), atol=1e-5, rtol=1e-5)


def reference_laurel(model, idx):
    """Section 2 per residual connection i (attention, then MLP, of each block): x_{i+1} = alpha_i f_i(x_i) + g_i
    with g = beta x_i (rw), beta (x_i + B A x_i) (lr), beta x_i + sum_{j<i} gamma_ij B A x_j (pa)."""
    lau, mode = model.laurel, str(model.cfg.laurel)
    x, rope = model.embed(idx)
    xs = [x]
    for i in range(2 * model.cfg.n_layer):
        block = model.blocks[i // 2]
        f = block.attn(block.ln_1(x), rope) if i % 2 == 0 else block.mlp(block.ln_2(x))
        beta = lau.betas[i]
        if mode == "rw":
            g = beta * x
        elif mode == "lr":
            A, Bm = lau.maps[i].a.weight, lau.maps[i].b.weight
            g = beta * (x + x @ A.T @ Bm.T)
        else:
            g = beta * x
            if i > 0:
                A, Bm = lau.maps[i - 1].a.weight, lau.maps[i - 1].b.weight
                gammas = lau.gammas[i * (i - 1) // 2:][:i]  # gamma_i0 .. gamma_i,i-1
                g = g + sum(gammas[j] * (xs[j] @ A.T @ Bm.T) for j in range(i))
        x = lau.alphas[i] * f + g
        xs.append(x)
    return model.head(x)


@pytest.mark.parametrize("style", [{}, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("case", LAUREL, ids=name)
def test_laurel_is_its_equation(case, style):
    torch.manual_seed(0)
    model = GPT(cfg_of(*case, style)).eval()
    perturb(model)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], reference_laurel(model, x), atol=1e-5, rtol=1e-5)


# --- initialisation ---

STYLES = [{}, {"pos": "rope"}, MODERN]


@pytest.mark.parametrize("style", STYLES, ids=lambda s: "-".join(s.values()) or "gpt2")
@pytest.mark.parametrize("case", LAUREL, ids=name)
def test_laurel_starts_as_the_baseline(case, style):
    """alpha = beta = 1 and B = 0: loaded with a baseline's weights, its logits are the baseline's; moved, not."""
    torch.manual_seed(0)
    baseline = GPT(cfg_of("baseline", style=style)).eval()
    variant = GPT(cfg_of(*case, style)).eval()
    missing, unexpected = variant.load_state_dict(baseline.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("laurel.") for k in missing)
    x = tokens(B=3)
    with torch.no_grad():
        assert (baseline(x)[0] - variant(x)[0]).abs().max().item() <= 1e-5
        perturb(variant)
        assert (baseline(x)[0] - variant(x)[0]).abs().max().item() > 1e-3
    lau = GPT(cfg_of(*case, style)).laurel
    assert torch.equal(lau.alphas, torch.ones(6)) and torch.equal(lau.betas, torch.ones(6))
    assert all(torch.equal(m.b.weight, torch.zeros_like(m.b.weight)) for m in lau.maps)
    if case[1]["laurel"] == "pa":  # gamma_i. = 1/i: the mean of the earlier activations
        torch.testing.assert_close(lau.gammas[3:6], torch.full((3,), 1 / 3))


@pytest.mark.parametrize("ffn_kv", [True, False])
def test_moda_does_not_start_as_the_baseline_but_its_first_block_does(ffn_kv):
    """The paper does not start at the baseline: the depth slots take softmax mass from step 0. Block 0 has no
    depth slots and is the baseline's block; with one block the model is the baseline."""
    torch.manual_seed(0)
    baseline = GPT(BASE).eval()
    moda = GPT(cfg_of("moda", {"moda_ffn_kv": ffn_kv})).eval()
    missing, unexpected = moda.load_state_dict(baseline.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("moda.ffn_kv.") for k in missing) and bool(missing) == ffn_kv
    x = tokens()
    with torch.no_grad():
        assert (baseline(x)[0] - moda(x)[0]).abs().max().item() > 1e-3
        torch.testing.assert_close(moda.hidden_states(x)[1], baseline.hidden_states(x)[1])  # h_1
        one, one_base = GPT(cfg_of("moda", n_layer=1)).eval(), GPT(replace(BASE, n_layer=1)).eval()
        one.load_state_dict(one_base.state_dict())
        torch.testing.assert_close(one(x)[0], one_base(x)[0])
    for proj in GPT(cfg_of("moda")).moda.ffn_kv:  # N(0, 0.02) like W_k, W_v; zero bias
        assert abs(proj.weight.std().item() - 0.02) < 0.003 and not proj.bias.any()


def test_moda_reports_its_depth_attention_mass():
    """layer_weights: per block l >= 1 the head-averaged mass on each earlier layer's depth slots (an attention's
    slot for its input layer l, an FFN's for l + 1), between 0 and 1 (the sequence keys take the rest)."""
    model = GPT(cfg_of("moda", n_layer=4)).eval()
    with torch.no_grad():
        lw = model.layer_weights(tokens())
    w = lw["weights"]
    assert lw["kind"] == "moda depth attention mass" and lw["sources"] == [0, 1, 2, 3, 4]
    assert lw["consumers"] == ["block 1", "block 2", "block 3"] and not lw["normalised"]
    assert w.shape == (2, 24, 3, 5) and (w >= 0).all() and (w.sum(-1) < 1).all() and (w.sum(-1) > 0).all()
    assert (w[:, :, 0, 2:] == 0).all() and (w[:, :, 1, 3:] == 0).all() and (w[:, :, 2, 4:] == 0).all()
    assert (w[:, :, 2, :4] > 0).all()  # block 3 reads layers 0..2 (attentions) and 1..3 (FFNs)


# --- decoding with the KV cache ---

CACHED = [("moda", {}), ("moda", {"moda_ffn_kv": False}), ("moda", MODERN), ("laurel", {"laurel": "pa"}),
          ("laurel", {"laurel": "rw"}), ("laurel", {"laurel": "lr", **MODERN})]


@pytest.mark.parametrize("arch,extra", CACHED, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_cached_logits_equal_a_full_forward_at_every_step(arch, extra):
    """MoDA's depth slots are the new token's own position, made in its own pass; LAuReL is per position: both
    decode with the blocks' KV cache, equal to a full forward over the window at every step (past block_size)."""
    torch.manual_seed(0)
    model = GPT(cfg_of(arch, extra, n_layer=3, block_size=12)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    assert supports_cache(model)
    decoder, uncached = KVCacheDecoder(model), FullForward(model)
    prompt = torch.randint(0, 40, (2, 5))
    logits, full = decoder.start(prompt), uncached.start(prompt)
    for _ in range(14):  # past block_size: the window is rebuilt from its last half twice
        with torch.no_grad():
            reference = model(decoder.seq)[0][:, -1]
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
        ids = torch.randint(0, 40, (2,))
        logits, full = decoder.push(ids), uncached.push(ids)


@pytest.mark.parametrize("arch", ["moda", "laurel"])
def test_they_have_no_early_exits(arch):
    """A variant runs its blocks its own way: exit decoding and drafts are refused in one line, the eval's
    decoding speeds measure plain decoding only, and the other variants still refuse the cache."""
    from shortcut.adaptive import draft_depth
    from shortcut.config import EvalConfig

    model = GPT(cfg_of(arch)).eval()
    with pytest.raises(ValueError, match=f"no early exits for this {arch} model"):
        ExitDecoder(model, 0.9)
    with pytest.raises(UserError, match="sample.exit=confidence"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), SampleConfig(n=1, exit="confidence"))
    with pytest.raises(UserError, match="sample.speculative=1"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), SampleConfig(n=1, speculative=1))
    assert draft_depth(model, EvalConfig()) is None
    assert generate(model, torch.zeros(1, 2, dtype=torch.long), SampleConfig(n=1, max_new_tokens=3)).cached
    other = GPT(cfg_of("denseformer")).eval()
    with pytest.raises(ValueError, match="no KV cache for denseformer"):
        other.new_cache(1)


# --- settings ---

@pytest.mark.parametrize("bad,key", [({"laurel": "dense"}, "laurel"), ({"laurel_rank": 0}, "laurel_rank"),
                                     ({"arch": "laurel", "laurel_rank": 33}, "laurel_rank"),
                                     ({"arch": "mixture"}, "arch")])
def test_bad_settings_name_the_key(bad, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        replace(BASE, **bad)


def test_a_rank_above_the_width_is_fine_for_other_archs():
    assert replace(BASE, laurel_rank=64).laurel_rank == 64  # only laurel reads it


# --- through the commands ---

@pytest.mark.parametrize("model,extra", [("moda", ["model.pos=rope"]),
                                         pytest.param("laurel", ["model.laurel=pa"], marks=pytest.mark.slow)])
def test_trains_evaluates_and_samples(tmp_path, prepared, model, extra):
    import json

    from conftest import TINY

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
    assert len(depth["logit_lens_nll"]) == 3  # h_0, h_1 and the output
    assert (depth.get("layer_weights") or {}).get("kind") == ("moda depth attention mass" if model == "moda" else None)
    record = sample(compose("sample", [f"run_dir={run}", "sample.n=1", "sample.max_new_tokens=8",
                                       "sample.prompt='The '"]))
    assert record["cache"] is True
