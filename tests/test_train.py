"""Training: learning happens, resume is exact (also after kill -9), failures are clean, eval covers the split."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import TINY
from shortcut.cli import compose
from shortcut.config import UserError
from shortcut import corpus
from shortcut.evaluate import evaluate
from shortcut.tracking import MetricsLog
from shortcut.train import lr_at, train


def job(prepared, *extra):
    return compose("train", prepared + TINY + list(extra))


def data_dir(prepared):
    return corpus.locate(prepared[0].split("=", 1)[1], compose("train", prepared).domain)


def test_lr_schedule_is_a_pure_function_of_step():
    cfg = compose("train", ["train.warmup_steps=10", "train.max_steps=100", "train.lr=1e-3", "train.min_lr=1e-4"]).train
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4) and lr_at(55, cfg) == pytest.approx(5.5e-4)


@pytest.mark.parametrize("arch", ["baseline", "shortcut"])
def test_loss_decreases_and_run_dir_is_complete(tmp_path, prepared, arch):
    run = tmp_path / "run"
    summary = train(job(prepared, f"model={arch}", "train.max_steps=200", "train.eval_every=100",
                        "train.log_every=50", "train.ckpt_every=50", "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=10"), run,
                    resolved_yaml="x: 1\n")
    rows = MetricsLog.read(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [50, 100, 150, 200]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # Below the characters' unigram entropy: the model uses context, it does not just count letters.
    counts = np.bincount(np.fromfile(data_dir(prepared) / "train.bin", dtype=np.uint16)).astype(float)
    p = counts[counts > 0] / counts.sum()
    assert summary.final_val_loss < -(p * np.log(p)).sum() - 0.2
    saved = json.loads((run / "summary.json").read_text())
    for key in ("params", "non_embedding_params", "flops_per_token", "final_val_loss", "best_val_loss",
                "wall_time_s", "git_commit", "seed", "data_hash"):
        assert key in saved
    assert rows[-1]["train_flops"] == 200 * 16 * 32 * saved["train_flops_per_token"]
    assert (run / "config.yaml").is_file() and len(list((run / "ckpt").glob("step_*.pt"))) == 2


def test_resume_continues_exactly(tmp_path, prepared):
    full = train(job(prepared, "model=shortcut", "train.max_steps=30", "train.ckpt_every=10"), tmp_path / "full")
    part = job(prepared, "model=shortcut", "train.max_steps=30", "train.ckpt_every=10")
    # A run that stopped after step 20: keep only its step-20 checkpoint and the metrics up to then.
    train(part, tmp_path / "part")
    ckpts = sorted((tmp_path / "part" / "ckpt").glob("step_*.pt"))
    ckpts[-1].unlink()  # step 30 never happened
    summary = train(part, tmp_path / "part")
    assert summary.final_val_loss == full.final_val_loss
    stamp = (tmp_path / "part" / "metrics.jsonl").stat().st_mtime_ns
    assert train(part, tmp_path / "part") == summary  # a finished run is not trained again
    assert (tmp_path / "part" / "metrics.jsonl").stat().st_mtime_ns == stamp
    a = MetricsLog.read(tmp_path / "full" / "metrics.jsonl")
    b = MetricsLog.read(tmp_path / "part" / "metrics.jsonl")
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in a] == [(r["step"], r["train_loss"], r["val_loss"]) for r in b]


def test_the_attention_kernel_is_recorded_and_a_change_on_resume_is_said(tmp_path, prepared, caplog):
    """model.attn_impl is an execution setting: a run may resume on another kernel (the same function), but its
    summary lists each kernel in order and the resume says so, never silently."""
    common = ["model=shortcut", "train.max_steps=20", "train.ckpt_every=10"]
    train(job(prepared, *common, "model.attn_impl=masked"), tmp_path / "r")
    sorted((tmp_path / "r" / "ckpt").glob("step_*.pt"))[-1].unlink()  # it stopped after step 10
    (tmp_path / "r" / "summary.json").unlink()
    summary = train(job(prepared, *common), tmp_path / "r")  # auto: chunked on a CPU
    assert summary.attn_kernels == ["masked", "chunked"]
    assert "resumes at step 10 with attention kernel chunked; it trained with masked until now" in caplog.text
    assert train(job(prepared, *common), tmp_path / "fresh").attn_kernels == ["chunked"]
    assert train(job(prepared, "train.max_steps=5"), tmp_path / "base").attn_kernels is None  # no such attention


def test_a_kernel_this_device_lacks_is_refused_before_the_run_dir_changes(tmp_path, prepared):
    run = tmp_path / "r"
    train(job(prepared, "model=shortcut", "train.max_steps=10"), run)
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(UserError, match="flex needs CUDA"):
        train(job(prepared, "model=shortcut", "train.max_steps=10", "model.attn_impl=flex", "train.resume=false"), run)
    assert sorted(p.name for p in run.rglob("*")) == before  # the fresh start never began


def test_corrupt_latest_checkpoint_falls_back(tmp_path, prepared, caplog):
    cfg = job(prepared, "train.max_steps=20", "train.ckpt_every=10")
    full = train(cfg, tmp_path / "a")
    ckpts = sorted((tmp_path / "a" / "ckpt").glob("step_*.pt"))
    ckpts[-1].write_bytes(b"not a checkpoint")
    summary = train(cfg, tmp_path / "a")  # resumes from step 10, redoes 11..20
    assert "unreadable" in caplog.text
    assert summary.final_val_loss == full.final_val_loss


def test_resume_refuses_other_settings(tmp_path, prepared):
    train(job(prepared, "train.max_steps=10"), tmp_path / "a")
    with pytest.raises(UserError, match="model.n_layer"):
        train(job(prepared, "train.max_steps=10", "model.n_layer=3"), tmp_path / "a")
    train(job(prepared, "train.max_steps=10", "model.n_layer=3", "train.resume=false"), tmp_path / "a")
    train(job(prepared, "train.max_steps=10", "model.n_layer=3", "domain.files=elsewhere/*.txt"), tmp_path / "a")
    with pytest.raises(UserError, match="no usable checkpoint"):
        train(job(prepared, "train.resume=true"), tmp_path / "fresh")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, prepared, monkeypatch):
    from shortcut import model as model_mod

    real = model_mod.GPT.forward
    calls = []

    def poisoned(self, idx, targets=None, **kwargs):
        logits, loss = real(self, idx, targets, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) > 12:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_mod.GPT, "forward", poisoned)
    with pytest.raises(UserError, match="nan by step 15.*step_00000010.pt"):  # read at log and checkpoint steps
        train(job(prepared, "train.max_steps=30", "train.ckpt_every=5", "train.keep_ckpts=3"), tmp_path / "r")
    names = sorted(p.name for p in (tmp_path / "r" / "ckpt").glob("*.pt"))
    assert names[-1] == "step_00000010.pt"
    torch.load(tmp_path / "r" / "ckpt" / names[-1], weights_only=True)


def test_block_size_larger_than_the_data(tmp_path, prepared):
    with pytest.raises(UserError, match="model.block_size=100000 is larger than the data allows"):
        train(job(prepared, "model.block_size=100000"), tmp_path / "r")


def test_missing_corpus_is_explained(tmp_path):
    with pytest.raises(UserError, match="shortcut prepare"):
        train(compose("train", [f"data.root={tmp_path}"] + TINY), tmp_path / "r")


@pytest.mark.slow
def test_eval_writes_the_documented_keys(tmp_path, prepared):
    train(job(prepared, "model=shortcut", "train.max_steps=10"), tmp_path / "r")
    result = evaluate(compose("eval", [f"run_dir={tmp_path / 'r'}"]))
    saved = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert saved == result
    assert result["n_tokens"] == json.loads((data_dir(prepared) / "meta.json").read_text())["tokens"]["test"] - 1
    assert result["test_ppl"] == pytest.approx(math.exp(result["test_nll"]))
    assert result["bits_per_token"] == pytest.approx(result["test_nll"] / math.log(2))
    assert result["bits_per_char"] == pytest.approx(result["bits_per_token"])  # char-level: one token per char
    assert result["flops_per_token"] > 0
    limited = evaluate(compose("eval", [f"run_dir={tmp_path / 'r'}", "eval.max_tokens=50"]))
    assert limited["n_tokens"] == 50
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run dir"):
        evaluate(compose("eval", [f"run_dir={tmp_path / 'empty'}"]))
    # a folder of runs (a sweep): each run is evaluated, and not again while its eval.json is current
    assert list(evaluate(compose("eval", [f"run_dir={tmp_path}"]))) == [str(tmp_path / "r")]  # last was partial
    assert evaluate(compose("eval", [f"run_dir={tmp_path}"])) == {}


@pytest.mark.slow
def test_wandb_offline_writes_under_the_run_dir(tmp_path, prepared, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(job(prepared, "model=shortcut", "train.max_steps=5", "wandb=offline"), tmp_path / "r")
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb"))
    # eval logs its numbers and audit pictures into the same W&B run (same id), compare into one of its own
    run_id = (tmp_path / "r" / "wandb_id").read_text()
    evaluate(compose("eval", [f"run_dir={tmp_path / 'r'}", "eval.audit_sequences=2"]))
    logged = sorted((tmp_path / "r" / "wandb").glob(f"offline-run-*-{run_id}/files/media/images/audit/*.png"))
    assert {p.name.split("_")[0] for p in logged} >= {"depth", "logit"}, logged
    assert list((tmp_path / "r" / "wandb").glob(f"offline-run-*-{run_id}/files/media/html/audit/report*.html"))
    from shortcut.compare import compare

    compare(compose("compare", [f"runs={tmp_path / 'r'}", f"results_root={tmp_path / 'res'}", "wandb=offline"]))
    assert list((tmp_path / "res" / "compare" / "wandb").glob("offline-run-*/files/media/table/compare_*.table.json"))


def test_wandb_online_without_a_key_fails_at_once(tmp_path, prepared, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # conftest's WANDB_MODE=disabled would win over wandb=online
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    t = time.time()
    with pytest.raises(UserError, match="wandb=online needs an API key"):
        train(job(prepared, "train.max_steps=5", "wandb=online"), tmp_path / "r")
    assert time.time() - t < 10


@pytest.mark.slow
def test_kill_9_and_resume_matches_an_uninterrupted_run(tmp_path, prepared):
    """The real thing: a training process killed with SIGKILL mid-run, then resumed from the command line."""
    args = [sys.executable, "-m", "shortcut.cli", "train", *prepared, *TINY, "model=shortcut",
            "train.max_steps=400", "train.ckpt_every=25", "train.eval_every=100", "train.log_every=25"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(args + [f"hydra.run.dir={tmp_path / 'twin'}"], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(args + [f"hydra.run.dir={tmp_path / 'killed'}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpt.glob("step_00000050.pt")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run(args + [f"hydra.run.dir={tmp_path / 'killed'}"], check=True, env=env, capture_output=True)
    twin = json.loads((tmp_path / "twin" / "summary.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert resumed["final_val_loss"] == twin["final_val_loss"]
    losses = lambda p: [(r["step"], r["train_loss"]) for r in MetricsLog.read(p / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "killed") == losses(tmp_path / "twin")


def test_grad_accum_2x8_equals_batch_16(prepared):
    """The step's batch is drawn from (seed, step) and split into micro-batches, so accumulation is exact."""
    from shortcut.data import TokenData
    from shortcut.model import GPT
    from shortcut.train import resolve_model

    data = TokenData(data_dir(prepared), 32)
    cfg = resolve_model(job(prepared, "model=shortcut").model, data.vocab_size)

    def grads(batch, accum):
        torch.manual_seed(0)
        model = GPT(cfg)
        total = 0.0
        for micro in range(accum):
            x, y = data.train_batch(3, 7, batch, accum, micro)
            loss = model(x, y)[1]
            (loss / accum).backward()
            total += loss.item() / accum
        return total, torch.cat([p.grad.flatten() for p in model.parameters()])

    loss16, g16 = grads(16, 1)
    loss8, g8 = grads(8, 2)
    assert loss8 == pytest.approx(loss16, abs=1e-6)
    torch.testing.assert_close(g8, g16, atol=1e-6, rtol=1e-5)


def test_resume_is_exact_with_dropout_and_accumulation(tmp_path, prepared):
    """The RNG restore matters once dropout draws from it."""
    cfg = job(prepared, "model=shortcut", "model.dropout=0.2", "train.grad_accum=2", "train.batch_size=4",
              "train.max_steps=20", "train.ckpt_every=10", "train.log_every=5")
    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "part")
    ckpts = sorted((tmp_path / "part" / "ckpt").glob("step_*.pt"))
    ckpts[-1].unlink()  # the run stopped after step 10
    (tmp_path / "part" / "summary.json").unlink()
    resumed = train(cfg, tmp_path / "part")
    assert resumed.final_val_loss == full.final_val_loss and resumed.checkpoint_hash == full.checkpoint_hash
    losses = lambda p: [(r["step"], r["train_loss"]) for r in MetricsLog.read(p / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    other_seed = train(job(prepared, "model=shortcut", "model.dropout=0.2", "train.grad_accum=2",
                           "train.batch_size=4", "train.max_steps=20", "seed=1"), tmp_path / "seed1")
    assert other_seed.checkpoint_hash != full.checkpoint_hash


def test_fresh_start_removes_everything_derived(tmp_path, prepared):
    run = tmp_path / "r"
    train(job(prepared, "train.max_steps=10"), run)
    evaluate(compose("eval", [f"run_dir={run}"]))
    (run / "wandb_id").write_text("abc")
    (run / "failed.txt").write_text("old failure")
    train(job(prepared, "train.max_steps=10", "model.n_layer=1", "train.resume=false"), run)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["ckpt", "metrics.jsonl",
                                                                                  "summary.json"]


def test_flops_budget_sets_the_steps(tmp_path, prepared):
    base = train(job(prepared, "train.max_steps=30", "train.warmup_steps=5"), tmp_path / "b")
    budget = base.train_flops
    sc = train(job(prepared, "model=shortcut", f"train.flops_budget={budget}", "train.warmup_steps=5"),
               tmp_path / "s")
    per_step = sc.tokens_per_step * sc.train_flops_per_token
    assert sc.max_steps == int(budget // per_step) and sc.max_steps < 30
    assert sc.train_flops <= budget < sc.train_flops + per_step  # the same compute, to within one step
    assert sc.train["max_steps"] == sc.max_steps  # its own full schedule: the cosine ends at its last step
    assert lr_at(sc.max_steps, compose("train", [f"train.max_steps={sc.max_steps}", "train.warmup_steps=5"]).train) \
        == pytest.approx(sc.train["min_lr"])
    other = train(job(prepared, "model=shortcut", f"train.flops_budget={budget / 2}", "train.warmup_steps=5"),
                  tmp_path / "s2")
    assert other.identity.variant_hash != sc.identity.variant_hash  # another budget is another row
    with pytest.raises(UserError, match="less than one step"):
        train(job(prepared, "train.flops_budget=10"), tmp_path / "tiny")
    with pytest.raises(UserError, match="needs the command line"):
        train(job(prepared, "train.match_flops=baseline"), tmp_path / "m")


@pytest.mark.slow
def test_match_flops_from_the_command_line(tmp_path, prepared):
    args = [sys.executable, "-m", "shortcut.cli", "train", *prepared, *TINY, "train.max_steps=30"]
    subprocess.run(args + ["model=baseline", f"hydra.run.dir={tmp_path / 'b'}"], check=True, capture_output=True)
    subprocess.run(args + ["model=shortcut", "train.match_flops=baseline", f"hydra.run.dir={tmp_path / 's'}"],
                   check=True, capture_output=True)
    b, s = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("b", "s"))
    assert s["max_steps"] < 30 and s["train_flops"] <= b["train_flops"] < s["train_flops"] + \
        s["tokens_per_step"] * s["train_flops_per_token"]
    assert "train.match_flops=baseline" in s["identity"]["variant_label"]
    # the model's kind given as a key is replaced too: this run matches the baseline's budget, and says it is one
    subprocess.run(args + ["model.arch=shortcut", "train.match_flops=baseline", f"hydra.run.dir={tmp_path / 'a'}"],
                   check=True, capture_output=True)
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert a["max_steps"] == s["max_steps"] and a["identity"]["variant_label"].startswith("shortcut ")
    r = subprocess.run(args + ["model=shortcut", "train.match_flops=nosuchmodel"], capture_output=True, text=True)
    assert r.returncode == 2 and "train.match_flops=nosuchmodel" in r.stderr and "Traceback" not in r.stderr


def test_one_trainer_per_run_dir(tmp_path, prepared):
    import fcntl

    run = tmp_path / "r"
    run.mkdir()
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `shortcut train` holds it
        with pytest.raises(UserError, match="another `shortcut train` is running in"):
            train(job(prepared, "train.max_steps=5"), run)
    train(job(prepared, "train.max_steps=5"), run)  # released: trains


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, prepared):
    cfg = job(prepared, "train.max_steps=20", "train.ckpt_every=10", "train.log_every=5")
    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "r")
    sorted((tmp_path / "r" / "ckpt").glob("step_*.pt"))[-1].unlink()
    (tmp_path / "r" / "summary.json").unlink()
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "tok')  # killed while appending
    assert train(cfg, tmp_path / "r").final_val_loss == full.final_val_loss
    assert [r["step"] for r in MetricsLog.read(tmp_path / "r" / "metrics.jsonl")] == [5, 10, 15, 20]
