"""Adaptive decoding (issue 21): exit decoding emits what the evaluation's confidence policy chooses and really skips
blocks; self-speculative greedy decoding is full-depth greedy decoding token for token, and sampling with it is
distributed as the full model's."""

from dataclasses import replace

import pytest
import torch

from shortcut.config import ModelConfig, SampleConfig, UserError
from shortcut.early_exit import confidence_choices
from shortcut.generate import ExitDecoder, KVCacheDecoder, SpeculativeDecoder, generate, next_token_probs
from shortcut.model import GPT

V = 40
BASE = ModelConfig(arch="baseline", n_layer=4, n_head=2, n_embd=32, block_size=24, vocab_size=V)
MODELS = {
    "baseline": BASE,
    "shortcut": replace(BASE, arch="shortcut"),
    "shortcut-add-bias-2": replace(BASE, arch="shortcut", shortcut_mode="add", tap_bias="last", shortcut_layers=2),
    "shortcut-sparse-rope": replace(BASE, arch="shortcut", taps=[0, 2, 3], pos="rope", norm="rmsnorm", mlp="swiglu"),
}


def make(name: str, **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(replace(MODELS[name], **kw)).eval()
    with torch.no_grad():  # away from the init (zero projections, tap biases), so that no test passes trivially
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def greedy(model, prompt, n):
    decoder, out = KVCacheDecoder(model), []
    logits = decoder.start(prompt)
    for _ in range(n):
        out.append(logits.argmax(dim=-1))
        logits = decoder.push(out[-1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", MODELS)
def test_speculative_greedy_is_full_depth_greedy_token_for_token(name):
    """Every draft depth, a few draft lengths, past two window slides (block_size 24, 50 new tokens)."""
    model = make(name)
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(1))
    reference = greedy(model, prompt, 50)
    for d in model.cfg.exit_depths()[:-1]:
        for k in (1, 4):
            spec = SpeculativeDecoder(model, d, k)
            assert torch.equal(spec.generate(prompt, 50), reference), (d, k)
            assert spec.rounds > 0 and 0 <= spec.accepted <= spec.drafted


@pytest.mark.slow
def test_speculative_sampling_is_distributed_as_the_full_model():
    """Two new tokens of a 3-token vocabulary at temperature 1: the speculative sampler's outcome frequencies over
    the 9 pairs (3,000 draws) against the full model's exact probabilities (chi-square), with a draft that differs
    from it (rejections happen)."""
    from scipy import stats

    cfg = ModelConfig(arch="baseline", n_layer=3, n_head=1, n_embd=8, block_size=8, vocab_size=3)
    torch.manual_seed(3)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)  # distinct distributions at depth 1 and at full depth (acceptance ~0.6)
    prompt = torch.tensor([[0, 1]])
    with torch.no_grad():
        first = model(prompt)[0][0, -1].softmax(-1)
        exact = torch.stack([first[a] * model(torch.tensor([[0, 1, a]]))[0][0, -1].softmax(-1) for a in range(3)])
    spec = SpeculativeDecoder(model, 1, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 3)
    for _ in range(3000):
        a, b = spec.generate(prompt, 2, temperature=1.0, generator=g)[0].tolist()
        counts[a, b] += 1
    assert 0 < spec.accepted < spec.drafted  # the draft is sometimes wrong, sometimes right
    expected = exact.flatten() * 3000
    keep = expected > 5
    p = stats.chisquare(counts.flatten()[keep], expected[keep] * counts.flatten()[keep].sum() / expected[keep].sum())
    assert p.pvalue > 1e-3, (counts, exact)


def test_the_sampling_filters_keep_a_distribution():
    logits = torch.randn(2, 10)
    for kw in ({}, {"top_k": 3}, {"top_p": 0.5}):
        probs = next_token_probs(logits, 0.7, **kw)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert (next_token_probs(logits, 1.0, top_k=3) > 0).sum(-1).tolist() == [3, 3]


def mid_threshold(model, x) -> float:
    """A threshold at which about half the tokens exit by the first depth: exits at several depths."""
    from shortcut.early_exit import _confidence_exits

    d, logp, _ = next(_confidence_exits(model, x, 2.0))
    return float(logp.max(-1).values.exp().median())


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_exit_decoding_emits_what_the_eval_policy_chooses(name):
    """Greedy exit decoding, step by step, against early_exit.confidence_choices over the sequence it made: the same
    tokens, the same exit depths (within one window, the policy's own unit)."""
    model = make(name, n_layer=5)
    with torch.no_grad():
        model.wte.weight.mul_(6.0)  # sharper exits, so that confidences spread over the depths
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(2))
    threshold = mid_threshold(model, torch.cat([prompt, greedy(model, prompt, 18)], dim=1))
    decoder = ExitDecoder(model, threshold)
    seq, logits = prompt, decoder.start(prompt)
    for _ in range(18):  # 4 + 18 < 24: no slide
        nxt = logits.argmax(dim=-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        logits = decoder.push(nxt)
    tokens, depth = confidence_choices(model, seq, threshold)
    assert torch.equal(tokens[:, 3:-1], seq[:, 4:])  # each emitted token is the policy's choice at its position
    decoded = torch.stack(decoder.exit_depth, dim=1)  # the depths the pushed tokens exited at
    assert torch.equal(decoded, depth[:, 4:])
    assert len(set(decoded.flatten().tolist())) >= 2  # tokens exit at several depths: the copies are exercised


@torch.no_grad()
def test_exit_decoding_skips_the_blocks_above_the_exit():
    """With a threshold every token meets at the first depth, no block above it runs its attention or MLP for a
    pushed token: the blocks only receive the copied state's keys and values."""
    model = make("baseline")
    calls = {i: 0 for i in range(4)}
    for i, block in enumerate(model.blocks):
        block.mlp.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    decoder = ExitDecoder(model, 1e-9)
    logits = decoder.start(torch.randint(0, V, (2, 5)))
    before = dict(calls)
    for _ in range(5):
        logits = decoder.push(logits.argmax(dim=-1))
    assert {i: calls[i] - before[i] for i in calls} == {0: 5, 1: 0, 2: 0, 3: 0}
    assert torch.stack(decoder.exit_depth).eq(1).all()


def test_generate_reports_the_figures_of_each_decoder():
    model = make("shortcut")
    prompt = torch.randint(0, V, (2, 5))
    plain = generate(model, prompt, SampleConfig(n=2, max_new_tokens=20, temperature=0))
    exits = generate(model, prompt, SampleConfig(n=2, max_new_tokens=20, temperature=0, exit="confidence",
                                                 exit_threshold=0.05))
    spec = generate(model, prompt, SampleConfig(n=2, max_new_tokens=20, temperature=0, speculative=1, draft_tokens=3))
    assert plain.decoder == "cache" and exits.decoder == "exit" and spec.decoder == "speculative"
    assert torch.equal(spec.tokens, plain.tokens)
    assert 1 <= exits.mean_exit_depth <= 3 and exits.flops_per_token < plain.flops_per_token
    assert 0 <= spec.acceptance <= 1 and spec.draft_depth == 1 and spec.tokens_per_s > 0


def test_decoding_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="sample.speculative"):
        SampleConfig(speculative=1, exit="confidence")
    with pytest.raises(ValueError, match="sample.cache"):
        SampleConfig(speculative=1, cache=False)
    with pytest.raises(UserError, match="sample.speculative=3"):  # the full depth is no draft
        generate(make("shortcut"), torch.zeros(1, 2, dtype=torch.long), SampleConfig(n=1, speculative=3))
    variant = GPT(replace(BASE, arch="denseformer")).eval()
    with pytest.raises(UserError, match="sample.exit=confidence"):
        generate(variant, torch.zeros(1, 2, dtype=torch.long), SampleConfig(n=1, exit="confidence"))
