"""Graceful stop (issue 19, item 4): SIGTERM and SIGINT end training after the current step with a checkpoint, one
line and exit status 128 + the signal, on 1 and 2 processes; the resumed run equals an uninterrupted one; a handler
installed before ours (Submitit's) runs after the checkpoint, and Submitit's requeue resumes the run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
from shortcut import stop, train as train_mod
from shortcut.cli import compose
from shortcut.rundir import Checkpoint
from shortcut.stop import Stopped, Watch
from shortcut.tracking import MetricsLog
from shortcut.train import train

FAST = ["train.batch_size=4", "train.device=cpu"]


def job(prepared, *extra):
    return compose("train", prepared + TINY + FAST + list(extra))


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """A real signal to this process, sent while training step `step` (1-based) runs."""
    real = train_mod.train_step

    def step_and_signal(loop, *args):
        real(loop, *args)
        if loop.step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(train_mod, "train_step", step_and_signal)


def rows(run):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in MetricsLog.read(run / "metrics.jsonl")]


def test_sigterm_between_rows_checkpoints_there_and_the_resumed_run_is_exact(tmp_path, prepared, monkeypatch,
                                                                            capfd):
    common = ["model=shortcut", "train.max_steps=30", "train.log_every=5", "train.ckpt_every=10"]
    full = train(job(prepared, *common), tmp_path / "full")
    signal_at(monkeypatch, 13, signal.SIGTERM)
    with pytest.raises(Stopped) as stopped:
        train(job(prepared, *common), tmp_path / "r")
    assert stopped.value.code == 143
    err = capfd.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("shortcut:")] == [
        f"shortcut: stopped at step 13 of 30 by SIGTERM; checkpoint written to {tmp_path / 'r'}/ckpt/"
        f"step_00000013.pt; the same command resumes"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back
    assert not (tmp_path / "r" / "summary.json").exists()
    monkeypatch.undo()
    resumed = train(job(prepared, *common), tmp_path / "r")
    assert resumed.checkpoint_hash == full.checkpoint_hash and resumed.final_val_loss == full.final_val_loss
    assert rows(tmp_path / "r") == rows(tmp_path / "full")  # the row at step 15 averages steps 11..15 again


def test_a_stop_at_a_checkpoint_step_writes_it_once(tmp_path, prepared, monkeypatch):
    signal_at(monkeypatch, 10, signal.SIGINT)
    with pytest.raises(Stopped) as stopped:
        train(job(prepared, "train.max_steps=30", "train.ckpt_every=10"), tmp_path / "r")
    assert stopped.value.code == 130
    assert [p.name for p in Checkpoint.paths(tmp_path / "r")] == ["step_00000010.pt"]


def test_a_signal_with_the_last_step_lets_the_run_finish(tmp_path, prepared, monkeypatch):
    signal_at(monkeypatch, 10, signal.SIGTERM)
    summary = train(job(prepared, "train.max_steps=10"), tmp_path / "r")
    assert summary.finished and (tmp_path / "r" / "summary.json").is_file()


def test_a_second_sigint_stops_at_once():
    watch = Watch().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first one only asks
        assert watch.due() == [signal.SIGINT]
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert stopped.value.immediate and stopped.value.code == 130
    finally:
        watch.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_installed_before_runs_after_the_checkpoint(tmp_path, prepared, monkeypatch):
    """Submitit's pattern: its USR2 handler is installed when training starts; ours checkpoints at the step
    boundary, then calls it (Submitit's would requeue and exit; this one returns, so training goes on). Under
    Submitit, SIGTERM (its warning before USR2) only checkpoints."""
    twin = train(job(prepared, "train.max_steps=20"), tmp_path / "twin")
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path / "submitit"))
    calls = []

    def theirs(signum, frame):
        calls.append((signum, sorted(p.name for p in Checkpoint.paths(tmp_path / "r"))))

    previous = signal.signal(signal.SIGUSR2, theirs)
    try:
        real = train_mod.train_step

        def step_and_signal(loop, *args):
            real(loop, *args)
            if loop.step in (7, 12):
                os.kill(os.getpid(), signal.SIGUSR2 if loop.step == 7 else signal.SIGTERM)

        monkeypatch.setattr(train_mod, "train_step", step_and_signal)
        summary = train(job(prepared, "train.max_steps=20", "train.ckpt_every=20", "train.keep_ckpts=5"),
                        tmp_path / "r")
        assert signal.getsignal(signal.SIGUSR2) is theirs
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [(signal.SIGUSR2, ["step_00000007.pt"])]
    assert summary.finished
    assert [p.name for p in Checkpoint.paths(tmp_path / "r")] == ["step_00000007.pt", "step_00000012.pt",
                                                                  "step_00000020.pt"]
    assert summary.checkpoint_hash == twin.checkpoint_hash


def test_policies():
    assert stop.policy(signal.SIGTERM, signal.SIG_DFL) == stop.STOP
    assert stop.policy(signal.SIGINT, signal.default_int_handler) == stop.STOP
    assert stop.policy(signal.SIGUSR2, lambda s, f: None) == stop.CHAIN


# --- the real thing: a signal sent to a training process from outside ---

def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _start(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "shortcut.cli", "train", *args], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _wait_for(path: Path, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def _check_one_line(err: str, max_steps: int) -> int:
    said = [ln for ln in err.splitlines() if ln.startswith("shortcut:")]
    assert len(said) == 1 and said[0].startswith("shortcut: stopped at step ") and "by SIGTERM" in said[0], err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "SignalException" not in err, err
    step = int(said[0].split("stopped at step ")[1].split()[0])
    assert f"of {max_steps} by" in said[0]
    return step


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(d.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_training_process(tmp_path, prepared, signum):
    args = [*prepared, *TINY, *FAST, "model=shortcut", "train.max_steps=3000", "train.ckpt_every=50",
            "train.log_every=25", f"hydra.run.dir={tmp_path / 'r'}"]
    proc = _start(args)
    _wait_for(tmp_path / "r" / "ckpt" / "step_00000050.pt", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    said = [ln for ln in err.splitlines() if ln.startswith("shortcut:")]
    assert len(said) == 1 and f"by {signal.Signals(signum).name}; checkpoint written to" in said[0], err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = int(said[0].split("stopped at step ")[1].split()[0])
    assert Checkpoint.latest(tmp_path / "r").step == step > 50


@pytest.mark.slow
def test_sigterm_to_the_process_group_of_a_two_process_run(tmp_path, prepared):
    """As SLURM does: SIGTERM to `shortcut train train.nproc=2` and its process group. Both workers stop after the
    same step (rank 0 gathers both RNG states into its checkpoint), one line, exit 143, the parent waits for them;
    the resumed run ends where an uninterrupted one does."""
    common = [*prepared, *TINY, *FAST, "train.max_steps=400", "train.ckpt_every=50", "train.log_every=25",
              "train.nproc=2"]
    run = tmp_path / "r"
    proc = _start(common + [f"hydra.run.dir={run}"], start_new_session=True)
    _wait_for(run / "ckpt" / "step_00000050.pt", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    step = _check_one_line(err, 400)
    assert "torch.distributed.elastic" not in err and "ChildFailedError" not in err, err
    assert not _processes_mentioning(str(run)), "a worker outlived the command"
    state = Checkpoint.latest(run)
    assert state.step == step and len(state.rng["cpu"]) == 2  # both processes handed over their state there
    assert not (run / "summary.json").exists() and not list((run / "ckpt").glob("*.tmp"))
    r = subprocess.run([sys.executable, "-m", "shortcut.cli", "train", *common, f"hydra.run.dir={run}"],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    twin = tmp_path / "twin"
    r = subprocess.run([sys.executable, "-m", "shortcut.cli", "train", *common, f"hydra.run.dir={twin}"],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run, twin))
    assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], abs=1e-6)
    for name, w in Checkpoint.latest(twin).model.items():
        torch.testing.assert_close(Checkpoint.latest(run).model[name], w, atol=1e-6, rtol=1e-5)
    assert [s for s, *_ in rows(run)] == [s for s, *_ in rows(twin)]


@pytest.mark.slow
def test_submitit_requeues_through_the_stop(tmp_path, prepared):
    """Hydra's Submitit launcher (local executor), as on SLURM at the time limit: USR2 to the job's process. Ours
    checkpoints at the step boundary and hands the signal to Submitit's handler, which requeues the job; the
    requeued job resumes from that checkpoint and ends exactly where an uninterrupted run does."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    common = [*prepared, *TINY, *FAST, "train.max_steps=600", "train.ckpt_every=100", "train.log_every=50"]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "shortcut.cli", "train", "-m", "hydra/launcher=submitit_local",
                             "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}", *common],
                            env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = sweep / "0"
    _wait_for(run / "ckpt" / "step_00000100.pt", proc)
    jobs = [p for p in _processes_mentioning("submitit.core._submit") if p in _processes_mentioning(str(sweep))]
    assert len(jobs) == 1
    os.kill(jobs[0], signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    logs = "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "Requeued job" in logs and "resumed from" in logs, logs[-3000:]
    said = [ln.split("shortcut: ", 1)[1] for ln in logs.replace("\r", "\n").splitlines() if "shortcut: SIGUSR2" in ln]
    assert len(said) == 1 and "checkpoint written to" in said[0], said
    stopped_at = int(said[0].split("at step ")[1].split()[0])
    assert 100 <= stopped_at < 600
    # the twin in a process with the same threads as the job's (OMP_NUM_THREADS=1): float sums depend on them
    r = subprocess.run([sys.executable, "-m", "shortcut.cli", "train", *common, f"hydra.run.dir={tmp_path / 'twin'}"],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary, twin = (json.loads((d / "summary.json").read_text()) for d in (run, tmp_path / "twin"))
    assert summary["checkpoint_hash"] == twin["checkpoint_hash"]
    assert rows(run) == rows(tmp_path / "twin")
