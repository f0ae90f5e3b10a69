"""Evaluation: the sliding window scores every token once with the promised context, matches a token-by-token
reference, and eval.json always describes the run's current checkpoint (re-run, retrain, stale records)."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from shortcut.cli import compose
from shortcut.compare import compare
from shortcut.config import UserError
from shortcut.evaluate import evaluate, load_run
from shortcut.scoring import sliding_windows, split_nll
from shortcut.rundir import Checkpoint
from shortcut.config import Precision
from shortcut.runtime import autocast
from shortcut.train import train


@pytest.mark.parametrize("n,T,stride,limit", [(101, 32, 16, None), (101, 32, 32, None), (101, 32, 1, None),
                                              (101, 32, 7, 60), (20, 32, 16, None), (33, 32, 16, None),
                                              (1000, 64, 48, None)])
def test_sliding_windows_score_every_token_once_with_context(n, T, stride, limit):
    windows = sliding_windows(n, T, stride, limit)
    targets = (n - 1) if limit is None else min(n - 1, limit)
    scored = [s + 1 + i for s, length, first in windows for i in range(first, length)]  # target token indices
    assert scored == list(range(1, targets + 1))  # each target once, in order
    assert windows[0] == (0, min(T, targets), 0)  # the first window scores all its tokens
    for s, length, first in windows[1:]:
        assert length == min(T, targets) and s >= 0 and s + length <= n - 1
        assert first >= length - stride  # context of every scored token >= block_size - stride


@pytest.fixture
def trained(tmp_path, prepared):
    run = tmp_path / "runs" / "r"
    train(compose("train", prepared + TINY + ["model=shortcut", "train.max_steps=60", "train.lr=3e-3",
                                              "train.warmup_steps=10"]), run)
    return run


def test_a_checkpoint_evaluates_on_a_device_its_attention_kernel_does_not_run_on(trained):
    """model.attn_impl is how the training device computed the attention (flex on a GPU, chunked on a CPU), not
    what: a checkpoint trained with flex loads on a CPU with the CPU's choice and gives the same logits."""
    path = Checkpoint.paths(trained)[-1]
    state = torch.load(path, weights_only=True)
    x = torch.randint(0, 50, (2, 16))
    before = load_run(trained)[0](x)[0]
    state["model_config"]["attn_impl"] = "flex"
    torch.save(state, path)
    model = load_run(trained)[0]
    assert model.cfg.attn_impl == "auto"
    torch.testing.assert_close(model(x)[0], before)


def test_sliding_nll_equals_a_token_by_token_reference(trained):
    model, data, _ = load_run(trained)
    T, stride, n = data.block_size, 12, 150
    total, count, mean_context = split_nll(model, data, "test", stride, n, 5, autocast(torch.device("cpu"),
                                                                                          Precision.float32))
    tokens = torch.from_numpy(data.splits["test"][:n + 1].astype("int64"))
    ref, contexts = 0.0, []
    with torch.no_grad():
        for j in range(1, n + 1):  # predict token j from exactly the context its window gives it
            start = next(s for s, length, first in sliding_windows(len(data.splits["test"]), T, stride, n)
                         if s + 1 + first <= j <= s + length)
            logits = model(tokens[None, start:j])[0][0, -1]
            ref += F.cross_entropy(logits[None], tokens[j:j + 1]).item()
            contexts.append(j - start)
    assert count == n and total == pytest.approx(ref, rel=1e-5)
    assert mean_context == pytest.approx(sum(contexts) / n)
    assert min(contexts[T:]) >= T - stride


def test_eval_json_records_what_it_measured(trained, prepared):
    result = evaluate(compose("eval", [f"run_dir={trained}", "eval.audit=false"]))
    saved = json.loads((trained / "eval.json").read_text())
    assert saved == result
    for key in ("stride", "mean_context", "checkpoint_step", "checkpoint_hash", "data_hash", "test_nll",
                "bits_per_char", "max_tokens", "format"):
        assert key in saved, key
    T = 32
    assert saved["stride"] == T // 2 and T // 2 < saved["mean_context"] < T
    summary = json.loads((trained / "summary.json").read_text())
    assert saved["checkpoint_hash"] == summary["checkpoint_hash"] and saved["checkpoint_step"] == 60
    flat = evaluate(compose("eval", [f"run_dir={trained}", "eval.audit=false", f"eval.stride={T}"]))
    assert flat["mean_context"] == pytest.approx((T + 1) / 2, abs=0.5)
    with pytest.raises(UserError, match="eval.stride=64 is longer"):
        evaluate(compose("eval", [f"run_dir={trained}", "eval.stride=64"]))


def test_more_context_scores_better_where_context_matters(tmp_path):
    """A text whose next character is determined by the last few: non-overlapping windows start from nothing
    every block_size tokens, so they must score worse than the sliding window."""
    import random

    from shortcut.prepare import prepare

    rng = random.Random(0)
    period = "".join(rng.choice("abcdefghijkl") for _ in range(37))
    (tmp_path / "t.txt").write_text(period * 800)
    base = [f"data.root={tmp_path / 'data'}", "domain=text", "domain.source=files"]
    prepare(compose("prepare", base + [f"domain.files={tmp_path / 't.txt'}"]))
    train(compose("train", base + TINY + ["train.max_steps=150", "train.lr=3e-3", "train.warmup_steps=10"]),
          tmp_path / "r")
    bits = {stride: evaluate(compose("eval", [f"run_dir={tmp_path / 'r'}", "eval.audit=false",
                                              f"eval.stride={stride}"]))["bits_per_char"] for stride in (16, 32)}
    assert bits[32] > bits[16] + 0.05, bits


def test_retrain_never_leaves_an_old_number(tmp_path, prepared):
    """Defect 1, as the issue reproduces it: train, eval, retrain the same dir from scratch, eval the sweep, compare."""
    run, sweep = tmp_path / "sweep" / "a", tmp_path / "sweep"
    common = prepared + TINY + ["train.max_steps=20"]
    train(compose("train", common + ["model.n_layer=2"]), run)
    first = evaluate(compose("eval", [f"run_dir={sweep}"]))[str(run)]
    assert (run / "audit" / "depth.json").is_file()
    train(compose("train", common + ["model.n_layer=1", "train.resume=false"]), run)
    assert not (run / "eval.json").exists() and not (run / "audit").exists()  # the fresh start removed them
    second = evaluate(compose("eval", [f"run_dir={sweep}"]))[str(run)]
    assert second["checkpoint_hash"] != first["checkpoint_hash"] and second["test_nll"] != first["test_nll"]
    row = compare(compose("compare", [f"runs={sweep}", f"results_root={tmp_path / 'res'}", "wandb=off"]))["rows"][0]
    assert row["test_nll"][0] == second["test_nll"]
    assert "n_layer=1" in row["dataset"] + row["variant"] or row["params"] < 30_000


@pytest.mark.slow
def test_sweep_eval_reruns_what_changed(trained):
    sweep = trained.parent
    cfg = compose("eval", [f"run_dir={sweep}", "eval.audit=false"])
    assert list(evaluate(cfg)) == [str(trained)]
    assert evaluate(cfg) == {}  # up to date
    assert list(evaluate(compose("eval", [f"run_dir={sweep}", "eval.audit=false", "eval.stride=8"]))) == [str(trained)]
    assert list(evaluate(compose("eval", [f"run_dir={sweep}"]))) == [str(trained)]  # now with the audit
    ev = trained / "eval.json"
    ev.write_text(json.dumps({**json.loads(ev.read_text()), "checkpoint_hash": "0" * 16}))  # another model's record
    assert list(evaluate(compose("eval", [f"run_dir={sweep}"]))) == [str(trained)]
    assert json.loads(ev.read_text())["checkpoint_hash"] != "0" * 16


def test_an_unreadable_final_checkpoint_is_not_replaced_by_an_older_one(tmp_path, prepared):
    run = tmp_path / "r"
    train(compose("train", prepared + TINY + ["train.max_steps=20", "train.ckpt_every=10"]), run)
    last = sorted((run / "ckpt").glob("step_*.pt"))[-1]
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match=r"final checkpoint .* \(step 20\) is missing or unreadable.*step 10.*"
                                        r"shortcut train"):
        evaluate(compose("eval", [f"run_dir={run}", "eval.audit=false"]))
    train(compose("train", prepared + TINY + ["train.max_steps=20", "train.ckpt_every=10"]), run)  # rebuilds it
    assert evaluate(compose("eval", [f"run_dir={run}", "eval.audit=false"]))["checkpoint_step"] == 20


def test_eval_finds_a_moved_corpus(tmp_path, prepared):
    import shutil

    run = tmp_path / "r"
    train(compose("train", prepared + TINY + ["train.max_steps=5"]), run)
    data = prepared[0].split("=", 1)[1]
    shutil.move(data, tmp_path / "moved")
    with pytest.raises(UserError, match="no prepared corpus"):
        evaluate(compose("eval", [f"run_dir={run}", "eval.audit=false"]))
    assert evaluate(compose("eval", [f"run_dir={run}", "eval.audit=false", f"data_root={tmp_path / 'moved'}"]))
