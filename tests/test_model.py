"""The two architectures: causality, the degenerate shortcut equals the baseline, counts match measurements."""

from dataclasses import replace
from functools import partial

import pytest
import torch
from conftest import (assert_causal_and_trainable, assert_flops_match_the_counter, assert_impl_matches_the_reference,
                      impls_to_test, tokens)

from shortcut.attention import (ATTENTION, chunked_depth_context_attention, depth_context_attention_probs,
                                resolve_attn_impl)
from shortcut.config import AttnImpl, ModelConfig, UserError
from shortcut.costs import match_params, param_counts
from shortcut.model import GPT

BASE = ModelConfig(arch="baseline", n_layer=3, n_head=2, n_embd=32, block_size=24, vocab_size=40)
SHORTCUT = replace(BASE, arch="shortcut")

# Every architecture switch of the shortcut, one tiny model each.
VARIANTS = [
    {}, {"taps": "every_2"}, {"taps": [0, 2]}, {"taps": [2]}, {"feature_map": "linear"}, {"feature_map": "none"},
    {"depth_embedding": False}, {"feature_hidden": 8}, {"bias": False}, {"n_layer": 1},
    {"attn_impl": "masked"}, {"attn_impl": "lse"}, {"attn_impl": "lse", "taps": [0, 2]},
]
# The attention implementations this machine runs (flex needs CUDA).
IMPLS = impls_to_test()


@pytest.mark.parametrize("cfg", [BASE] + [replace(SHORTCUT, **v) for v in VARIANTS],
                         ids=["baseline"] + [f"shortcut-{v}" for v in VARIANTS])
def test_causal_and_trainable(cfg):
    torch.manual_seed(0)
    assert_causal_and_trainable(GPT(cfg).eval())


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_attention_probabilities_are_normalised(variant):
    cfg = replace(SHORTCUT, **variant)
    model = GPT(cfg).eval()
    logits, probs = model.depth_attention(tokens())
    K = len(cfg.tap_layers())
    assert probs.shape == (2, 24, K, 24)
    torch.testing.assert_close(probs.sum(dim=(2, 3)), torch.ones(2, 24))
    future = torch.ones(24, 24, dtype=torch.bool).triu(diagonal=1)  # key s > query t
    assert probs.permute(0, 2, 1, 3)[:, :, future].abs().max() == 0
    # The explicit-softmax path used for auditing computes the same function as the fused one.
    torch.testing.assert_close(logits, model(tokens())[0], atol=1e-5, rtol=1e-5)


def test_degenerate_shortcut_is_the_baseline():
    torch.manual_seed(0)
    baseline = GPT(BASE).eval()
    degenerate = replace(SHORTCUT, taps=[BASE.n_layer - 1], feature_map="none", depth_embedding=False)
    shortcut = GPT(degenerate).eval()
    shortcut.load_state_dict(baseline.state_dict())  # strict: the same parameters, the same names
    x = tokens(B=3)
    diff = (baseline(x)[0] - shortcut(x)[0]).abs().max().item()
    assert diff <= 1e-5


def test_shortcut_starts_with_identity_feature_maps():
    model = GPT(SHORTCUT)
    h = torch.randn(2, 5, 32)
    for f in model.feature_maps:
        torch.testing.assert_close(f(h), h)


@pytest.mark.parametrize("cfg,T", [
    (BASE, 24), (SHORTCUT, 24), (replace(SHORTCUT, feature_map="linear", taps="every_2"), 24),
    (replace(SHORTCUT, feature_map="none", bias=False), 24), (replace(SHORTCUT, taps=[0, 2], feature_hidden=8), 24),
    (replace(SHORTCUT, n_layer=1), 24), (replace(SHORTCUT, taps=[2]), 24), (SHORTCUT, 13), (BASE, 13)],
    ids=["base", "sc", "sc-lin", "sc-none", "sc-gaps", "sc-L1", "sc-last", "sc-T13", "base-T13"])
def test_flops_match_the_counter(cfg, T):
    """The analytic count is the counter's count exactly (MATH: attention counted as its two matmuls)."""
    model = GPT(replace(cfg, attn_impl="masked"))  # the reference, whose attention is one SDPA call
    x = tokens(B=2, T=T)
    assert_flops_match_the_counter(model, cfg, x)


def test_param_counts():
    model = GPT(SHORTCUT)
    counts = param_counts(SHORTCUT)
    assert counts.params == sum(p.numel() for p in model.parameters())
    assert counts.non_embedding_params == counts.params - 40 * 32 - 24 * 32
    assert param_counts(SHORTCUT).params > param_counts(BASE).params


@pytest.mark.parametrize("by", ["width", "depth"])
@pytest.mark.parametrize("size", [dict(n_layer=3, n_embd=32, n_head=2), dict(n_layer=6, n_embd=128, n_head=4)])
def test_parameter_matching(by, size):
    sc = replace(SHORTCUT, **size)
    target = param_counts(sc).params
    matched = match_params(replace(BASE, **size, match_params="shortcut", match_by=by))
    assert matched.arch == "baseline" and matched.match_params is None
    got = param_counts(matched).params
    assert abs(got - target) / target < 0.02, (got, target)
    GPT(matched)(tokens())  # and it runs


@pytest.mark.parametrize("taps,expected", [("all", [0, 1, 2, 3]), ("every_2", [1, 3]), ("every_3", [0, 3]),
                                           ([3, 0], [0, 3])])
def test_tap_choices(taps, expected):
    assert replace(SHORTCUT, n_layer=4, taps=taps).tap_layers() == expected


@pytest.mark.parametrize("bad", [{"taps": [0, 7]}, {"taps": []}, {"taps": "every_0"}, {"taps": "some"},
                                 {"taps": [1, 1]}, {"n_embd": 30, "n_head": 4}, {"dropout": 1.5},
                                 {"attn_impl": "fast"}])
def test_bad_model_configs(bad):
    with pytest.raises(ValueError):
        replace(SHORTCUT, **bad)


# --- attention implementations: each computes the masked reference's function, values and gradients ---

def qkv(B, nh, K, T, hs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, hs, generator=g)
    # k, v as the model makes them: a (B, nh, K, T, hs) view of one (B, K, T, 2C) projection
    kv = torch.randn(B, K, T, 2 * nh * hs, generator=g)
    k, v = (t.view(B, K, T, nh, hs).permute(0, 3, 1, 2, 4) for t in kv.split(nh * hs, dim=-1))
    return [t.detach().requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K,T", [(1, 1), (3, 1), (1, 24), (4, 17), (2, 70), (5, 129)])
def test_attention_impls_match_the_reference(impl, K, T):
    device = "cuda" if impl == AttnImpl.flex else "cpu"
    q, k, v = (t.detach().to(device).requires_grad_() for t in qkv(2, 3, K, T, 16))
    dy = torch.randn(2, 3, T, 16, generator=torch.Generator().manual_seed(1)).to(device)
    outs = []
    for f in (ATTENTION[AttnImpl.masked], ATTENTION[impl]):
        y = f(q, k, v)
        outs.append((y, *torch.autograd.grad(y, (q, k, v), dy)))
    for ref, got in zip(*outs):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant,T", [({}, 1), ({}, 70), ({"taps": [3]}, 37), ({"taps": [0, 3]}, 70),
                                       ({"taps": "every_2", "feature_map": "linear"}, 33), ({"n_layer": 1}, 70)],
                         ids=lambda v: str(v))
def test_models_with_each_impl_match_the_reference(impl, variant, T):
    """Logits, loss and the gradient of every parameter, at T not a multiple of any kernel block."""
    assert_impl_matches_the_reference(replace(SHORTCUT, **{"n_layer": 4, "block_size": 80, **variant}), impl, T)


@pytest.mark.parametrize("chunk", [1, 5, 16, 200])  # one position, not dividing T, dividing 64, beyond T
@pytest.mark.parametrize("K,T", [(1, 24), (4, 17), (3, 64), (2, 70)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_attention_matches_the_reference_at_every_chunk_size(chunk, K, T, with_bias):
    """The chunked path's chunk boundaries (forward: query chunks; backward: key chunks) never change the function."""
    q, k, v = qkv(2, 3, K, T, 16)
    bias = (torch.randn(3, K, generator=torch.Generator().manual_seed(2)) * 2).requires_grad_() if with_bias else None
    inputs = (q, k, v) + ((bias,) if with_bias else ())
    dy = torch.randn(2, 3, T, 16, generator=torch.Generator().manual_seed(1))
    outs = []
    for f in (ATTENTION[AttnImpl.masked], partial(chunked_depth_context_attention, chunk=chunk)):
        y = f(q, k, v, bias=bias)
        outs.append((y, *torch.autograd.grad(y, inputs, dy)))
    for ref, got in zip(*outs):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_chunked_attention_is_causal_and_runs_in_bf16():
    """Changing keys/values at positions > t leaves output t unchanged, at chunk boundaries and inside a chunk; the
    bfloat16 path (CPU autocast) stays within bf16 rounding of the float32 reference."""
    q, k, v = (t.detach() for t in qkv(1, 2, 3, 40, 16))
    y = chunked_depth_context_attention(q, k, v, chunk=8)
    for t in (0, 7, 8, 21, 38):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, :, t + 1:] += 3.0
        v2[:, :, :, t + 1:] -= 5.0
        y2 = chunked_depth_context_attention(q, k2, v2, chunk=8)
        torch.testing.assert_close(y2[:, :, :t + 1], y[:, :, :t + 1], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(y2[:, :, t + 1:], y[:, :, t + 1:])
    low = chunked_depth_context_attention(*(t.bfloat16() for t in (q, k, v)), chunk=8)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), y, atol=3e-2, rtol=3e-2)


def test_chunked_attention_takes_any_strides():
    """A q whose head dimension is strided gives the same output (the CPU kernel wants a unit stride)."""
    q, k, v = (t.detach() for t in qkv(2, 4, 6, 64, 16))
    strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(chunked_depth_context_attention(strided, k, v, chunk=16),
                               chunked_depth_context_attention(q, k, v, chunk=16))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_layout_on_cpu():
    """flex's mask over the tap-major layout, checked where it can run here: eager, forward only."""
    q, k, v = (t.detach() for t in qkv(2, 2, 3, 37, 16))
    torch.testing.assert_close(ATTENTION[AttnImpl.flex](q, k, v), ATTENTION[AttnImpl.masked](q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_auto_picks_an_exact_impl_for_the_device():
    assert resolve_attn_impl(AttnImpl.auto, "cpu") == AttnImpl.chunked  # measured fastest; never flex on CPU
    assert resolve_attn_impl("auto", "cuda") in (AttnImpl.masked, AttnImpl.lse, AttnImpl.flex)
    assert resolve_attn_impl("lse", "cpu") == AttnImpl.lse
    with pytest.raises(UserError, match="needs CUDA"):
        resolve_attn_impl("flex", "cpu")
    with pytest.raises(UserError, match="CPU kernel only"):
        resolve_attn_impl("chunked", "cuda")
    with pytest.raises(UserError):  # the model says so in its first forward
        GPT(replace(SHORTCUT, attn_impl="flex"))(tokens())
    assert ModelConfig(attn_impl="lse").attn_impl is AttnImpl.lse


def test_dropout_trains_with_every_impl():
    """Attention dropout is the reference's: the fast paths hand over to it while training with dropout."""
    for impl in IMPLS:
        if impl == AttnImpl.flex:
            continue
        model = GPT(replace(SHORTCUT, dropout=0.1, attn_impl=impl)).train()
        x = tokens()
        model(x, x)[1].backward()
        assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 4 * 2 * 3 * 4 * 30 * 7, 2**30])  # c = 1, 7 (not dividing T), T
def test_audit_probabilities_in_chunks_match_the_reference(chunk_bytes):
    q, k, v = (t.detach() for t in qkv(2, 3, 4, 30, 8))
    y, probs = depth_context_attention_probs(q, k, v, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(y, ATTENTION[AttnImpl.masked](q, k, v), atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 3, 30, 4, 30) and probs.dtype == torch.float32
    # the explicit reference: one softmax over all K*T keys under the (T, K*T) mask
    scores = q @ k.flatten(2, 3).transpose(-2, -1) / 8 ** 0.5
    mask = torch.ones(30, 30, dtype=torch.bool).tril().repeat(1, 4)
    ref = scores.masked_fill(~mask, float("-inf")).softmax(-1).view(2, 3, 30, 4, 30)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)
