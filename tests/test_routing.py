"""Mixture-of-Depths routing (issue 21): real gather/scatter, causal in the mode evaluation and decoding use, top-k
in training, FLOPs as counted, a cache that equals the full forward, and one-line refusals."""

from dataclasses import replace

import pytest
import torch
from conftest import assert_causal_and_trainable, assert_flops_match_the_counter, tokens

from shortcut.config import ModelConfig
from shortcut.costs import flops_per_token
from shortcut.generate import KVCacheDecoder
from shortcut.model import GPT
from shortcut.routing import RoutedBlock, routing_mode

BASE = ModelConfig(arch="baseline", n_layer=4, n_head=2, n_embd=32, block_size=24, vocab_size=40, mod_capacity=0.25,
                   mod_every=1, attn_impl="masked")
ROUTED = {
    "baseline": BASE,
    "baseline-rope": replace(BASE, pos="rope", norm="rmsnorm", mlp="swiglu"),
    "shortcut": replace(BASE, arch="shortcut", taps=[0, 2, 3]),
    "shortcut-add-bias-2": replace(BASE, arch="shortcut", shortcut_mode="add", tap_bias="last", shortcut_layers=2),
}


def routed(name: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ROUTED[name])
    with torch.no_grad():  # routers away from ~0, so that decisions vary and r·f is not negligible
        for block in model.blocks:
            if isinstance(block, RoutedBlock):
                block.router.weight.normal_(0, 1.0)
    return model


def test_the_routed_blocks_are_every_kth_never_the_last_nor_a_shortcut_block():
    assert replace(BASE, n_layer=12, mod_every=2).routed_blocks() == [1, 3, 5, 7, 9]
    sc = replace(BASE, arch="shortcut", n_layer=12, mod_every=2, taps=[0, 6, 11], shortcut_layers=2)
    assert sc.routed_blocks() == [1, 3, 5, 7, 9]  # 10 and 11 read the taps
    assert BASE.routed_blocks() == [0, 1, 2] and replace(BASE, mod_capacity=None).routed_blocks() == []
    assert [type(b).__name__ for b in GPT(ROUTED["shortcut-add-bias-2"]).blocks] == [
        "RoutedBlock", "RoutedBlock", "ShortcutBlock", "ShortcutBlock"]


@pytest.mark.parametrize("name", ROUTED)
def test_causal_in_the_mode_evaluation_and_decoding_use(name):
    """Changing token t changes no output before t (the router's own decision), and every parameter learns."""
    assert_causal_and_trainable(routed(name).eval())


def test_training_routes_exactly_k_tokens_a_row_and_looks_ahead():
    """Top-k over the sequence is the paper's training rule: k = c·T per row, chosen with later tokens' scores,
    which is why evaluation may not use it."""
    model = routed("baseline")
    x = tokens(B=3, T=24)
    trace = model.run(model.start(x))
    for i in model.cfg.routed_blocks():
        assert trace.processed[i].sum(dim=1).tolist() == [6, 6, 6]  # 0.25 x 24
    x2 = x.clone()
    x2[:, 15:] = (x2[:, 15:] + 7) % 40
    differs = [not torch.equal(model(x)[0][:, :15], routed("baseline", s)(x2)[0][:, :15]) for s in (0,)]
    assert any(differs)  # the future moved the choice of earlier tokens


@pytest.mark.parametrize("name", ["baseline", "shortcut"])
def test_a_routed_block_runs_on_its_tokens_only(name):
    """Real gather/scatter: the block's attention and MLP see (B, k, C), and the tokens it skips come out as they
    went in, bit for bit."""
    model = routed(name)
    seen = []
    block = model.blocks[model.cfg.routed_blocks()[0]]
    block.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    x = tokens(B=2, T=24)
    trace = model.start(x)
    i = model.cfg.routed_blocks()[0]
    model.run(trace, i + 1)
    assert seen == [torch.Size([2, 6, 32])]
    skipped = ~trace.processed[i]
    assert torch.equal(trace.states[i + 1][skipped], trace.states[i][skipped])
    assert not torch.equal(trace.states[i + 1][~skipped], trace.states[i][~skipped])


@pytest.mark.parametrize("name", ROUTED)
def test_flops_match_the_counter_at_the_training_capacity(name):
    assert_flops_match_the_counter(routed(name), ROUTED[name], tokens(B=2, T=24))
    dense = flops_per_token(replace(ROUTED[name], mod_capacity=None)).forward
    assert flops_per_token(ROUTED[name]).forward < dense


@pytest.mark.parametrize("name", ROUTED)
def test_cached_decoding_equals_the_full_causal_forward(name):
    """The cache keeps the keys of the tokens a routed block processed only; every step's logits equal a full
    forward in evaluation mode, across a window slide."""
    model = routed(name).eval()
    decoder = KVCacheDecoder(model)
    x = tokens(B=2, T=12)
    with torch.no_grad():
        logits = decoder.start(x)
        for _ in range(16):  # past block_size = 24: the window slides once
            torch.testing.assert_close(logits, model(decoder.seq)[0][:, -1], atol=1e-5, rtol=1e-5)
            logits = decoder.push(logits.argmax(dim=-1))


def test_training_mode_can_be_asked_for_at_evaluation():
    model = routed("shortcut")
    x = tokens(B=2, T=24)
    train_logits = model(x)[0]
    model.eval()
    with routing_mode(model, "topk"):
        torch.testing.assert_close(model(x)[0], train_logits)
    assert not torch.allclose(model(x)[0], train_logits)


def test_the_router_loss_joins_the_training_loss():
    model = routed("baseline")
    x = tokens(B=2, T=24)
    torch.manual_seed(1)
    with_aux = model(x, x)[1]
    model.cfg = replace(model.cfg, mod_aux_weight=0.0)
    torch.manual_seed(1)
    without = model(x, x)[1]
    assert with_aux.item() > without.item()


@pytest.mark.parametrize("kw,key", [
    ({"arch": "denseformer"}, "model.mod_capacity"), ({"exit_train": 0.5}, "model.mod_capacity"),
    ({"mod_capacity": 0.0}, "model.mod_capacity"), ({"mod_capacity": 1.5}, "model.mod_capacity"),
    ({"n_layer": 1}, "model.mod_every"), ({"mod_every": 0}, "model.mod_every"),
])
def test_what_does_not_compose_is_refused_in_one_line(kw, key):
    with pytest.raises(ValueError, match=key):
        replace(BASE, **kw)


def test_train_and_eval_a_routed_run_report_both_nlls_the_shares_and_the_blocks_run(tmp_path, prepared):
    """The commands end to end: a routed shortcut trains, and eval.json holds the causal NLL (the headline), the
    training rule's beside it, the causal shares, and the audit the blocks each token ran."""
    import json

    from conftest import TINY

    from shortcut.cli import compose
    from shortcut.evaluate import evaluate
    from shortcut.train import train

    run = tmp_path / "routed"
    train(compose("train", prepared + TINY + ["model=shortcut", "model.n_layer=4", "model.mod_capacity=0.25",
                                              "model.mod_every=2", "train=smoke", "train.max_steps=8"]), run)
    evaluate(compose("eval", [f"run_dir={run}", "eval.max_tokens=300", "eval.audit_sequences=2"]))
    record = json.loads((run / "eval.json").read_text())
    routing = record["routing"]
    assert routing["routed_blocks"] == [1] and len(routing["causal_share"]) == 1
    assert 0 <= routing["causal_share"][0] <= 1 and routing["train_mode_nll"] > 0
    assert routing["train_mode_nll"] != record["test_nll"]  # two rules, two numbers
    blocks = record["audit"]["blocks_run"]
    assert 3 <= blocks["mean"] <= 4 and abs(sum(blocks["share"].values()) - 1) < 1e-9


def test_eval_measures_decoding_speeds_of_an_exit_trained_run(tmp_path, prepared):
    import json

    from conftest import TINY

    from shortcut.cli import compose
    from shortcut.evaluate import evaluate, needs_eval
    from shortcut.train import train

    run = tmp_path / "exits"
    train(compose("train", prepared + TINY + ["model=shortcut", "model.n_layer=3", "model.exit_train=0.5",
                                              "train=smoke", "train.max_steps=6"]), run)
    args = [f"run_dir={run}", "eval.max_tokens=200", "eval.audit=false", "eval.decode_tokens=24"]
    evaluate(compose("eval", args))
    decode = json.loads((run / "eval.json").read_text())["decode"]
    assert set(decode) >= {"plain", "exit", "speculative"} and decode["draft_depth"] == 1
    assert decode["speculative"]["same_output"] is True and decode["plain"]["speedup"] == 1.0
    assert 1 <= decode["exit"]["mean_exit_depth"] <= 2
    assert needs_eval(run, compose("eval", args).eval) is None
    assert "decoding" in needs_eval(run, compose("eval", args[:-1] + ["eval.decode_tokens=30"]).eval)
    from shortcut.compare import compare  # and compare reads what eval wrote (issue 21's table)

    summary = compare(compose("compare", [f"runs={run}", f"results_root={tmp_path / 'results'}", "wandb=off"]))
    figures = summary["rows"][0]["adaptive"]
    assert figures["speculative"]["speedup"] == pytest.approx(decode["speculative"]["speedup"])
    assert figures["exit"]["nll_increase"] == pytest.approx(decode["exit"]["nll"] - decode["exit"]["full_nll"])
