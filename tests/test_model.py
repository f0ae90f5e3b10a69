"""The two architectures: causality, the degenerate shortcut equals the baseline, counts match measurements."""

from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from shortcut.config import ModelConfig
from shortcut.model import GPT, flops_per_token, match_params, param_counts

BASE = ModelConfig(arch="baseline", n_layer=3, n_head=2, n_embd=32, block_size=24, vocab_size=40)
SHORTCUT = replace(BASE, arch="shortcut")

# Every architecture switch of the shortcut, one tiny model each.
VARIANTS = [
    {}, {"taps": "every_2"}, {"taps": [0, 2]}, {"taps": [2]}, {"feature_map": "linear"}, {"feature_map": "none"},
    {"depth_embedding": False}, {"feature_hidden": 8}, {"bias": False}, {"n_layer": 1},
]


def tokens(B=2, T=24, seed=0):
    return torch.randint(0, 40, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [BASE] + [replace(SHORTCUT, **v) for v in VARIANTS],
                         ids=["baseline"] + [f"shortcut-{v}" for v in VARIANTS])
def test_causal_and_trainable(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = tokens()
    logits, loss, _ = model(x, x)
    x2 = x.clone()
    x2[:, 15:] = (x2[:, 15:] + 7) % 40  # change the future
    logits2, _, _ = model(x2)
    assert torch.equal(logits[:, :15], logits2[:, :15]), "earlier logits depend on later tokens"
    assert not torch.allclose(logits[:, 15:], logits2[:, 15:])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_attention_probabilities_are_normalised(variant):
    cfg = replace(SHORTCUT, **variant)
    model = GPT(cfg).eval()
    logits, _, probs = model(tokens(), return_attn=True)
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


@pytest.mark.parametrize("cfg", [BASE, SHORTCUT, replace(SHORTCUT, feature_map="linear", taps="every_2"),
                                 replace(SHORTCUT, feature_map="none", bias=False)], ids=["base", "sc", "sc-lin", "sc-none"])
def test_flops_match_the_counter(cfg):
    model = GPT(cfg)
    x = tokens(B=2, T=cfg.block_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # MATH: counted as matmuls
        model(x)
    measured = counter.get_total_flops() / x.numel()
    analytic = flops_per_token(cfg)["forward"]
    assert abs(analytic - measured) / measured < 0.10, (analytic, measured)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    measured_train = counter.get_total_flops() / x.numel()
    assert abs(flops_per_token(cfg)["train"] - measured_train) / measured_train < 0.10, measured_train


def test_param_counts():
    model = GPT(SHORTCUT)
    counts = param_counts(SHORTCUT)
    assert counts["params"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding_params"] == counts["params"] - 40 * 32 - 24 * 32
    assert param_counts(SHORTCUT)["params"] > param_counts(BASE)["params"]


@pytest.mark.parametrize("by", ["width", "depth"])
@pytest.mark.parametrize("size", [dict(n_layer=3, n_embd=32, n_head=2), dict(n_layer=6, n_embd=128, n_head=4)])
def test_parameter_matching(by, size):
    sc = replace(SHORTCUT, **size)
    target = param_counts(sc)["params"]
    matched = match_params(replace(BASE, **size, match_params="shortcut", match_by=by))
    assert matched.arch == "baseline" and matched.match_params is None
    got = param_counts(matched)["params"]
    assert abs(got - target) / target < 0.02, (got, target)
    GPT(matched)(tokens())  # and it runs


@pytest.mark.parametrize("taps,expected", [("all", [0, 1, 2, 3]), ("every_2", [1, 3]), ("every_3", [0, 3]),
                                           ([3, 0], [0, 3])])
def test_tap_choices(taps, expected):
    assert replace(SHORTCUT, n_layer=4, taps=taps).tap_layers() == expected


@pytest.mark.parametrize("bad", [{"taps": [0, 7]}, {"taps": []}, {"taps": "every_0"}, {"taps": "some"},
                                 {"taps": [1, 1]}, {"n_embd": 30, "n_head": 4}, {"dropout": 1.5}])
def test_bad_model_configs(bad):
    with pytest.raises(ValueError):
        replace(SHORTCUT, **bad)
