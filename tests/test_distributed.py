"""Data parallelism: two gloo processes on the CPU do the same optimisation as one process, and resume across a
change of the number of processes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY
from shortcut.rundir import Checkpoint

pytestmark = pytest.mark.slow  # each torchrun start costs a few seconds


def run(args, nproc=1, torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "shortcut", "train", *args]
    else:
        cmd = [sys.executable, "-m", "shortcut", "train", *args, f"train.nproc={nproc}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(run_dir):
    return Checkpoint.latest(run_dir).model


def test_two_processes_equal_one(tmp_path, prepared):
    args = [*prepared, *TINY, "model=shortcut", "train.max_steps=20", "train.batch_size=8", "train.grad_accum=2",
            "train.ckpt_every=10", "train.log_every=5", "train.device=cpu"]
    run(args + [f"hydra.run.dir={tmp_path / 'one'}"])
    two_dir = tmp_path / "two, it's"  # a run dir that needs quoting on the way to torchrun
    run(args + [f"hydra.run.dir='{tmp_path}/two, it\\'s'"], nproc=2)  # the short spelling launches torchrun
    run(args + [f"hydra.run.dir={tmp_path / 'tr'}"], nproc=2, torchrun=True)  # torchrun by hand
    one, two, tr = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", two_dir.name, "tr"))
    assert two["nproc"] == 2 and one["nproc"] == 1
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-5)
    assert tr["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-5)
    for name, w in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(two_dir)[name], w, atol=1e-5, rtol=1e-4)
    rows = lambda d: [json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa
    assert [r["step"] for r in rows(two_dir.name)] == [r["step"] for r in rows("one")]
    for a, b in zip(rows("one"), rows(two_dir.name)):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
    assert not (two_dir / "failed.txt").exists() and (two_dir / "config.yaml").is_file()


def test_resume_across_a_change_of_processes(tmp_path, prepared):
    args = [*prepared, *TINY, "train.max_steps=20", "train.batch_size=8", "train.ckpt_every=10",
            "train.device=cpu"]
    run(args + [f"hydra.run.dir={tmp_path / 'full'}"])
    run(args + [f"hydra.run.dir={tmp_path / 'r'}"], nproc=2)
    (tmp_path / "r" / "ckpt" / "step_00000020.pt").unlink()  # it stopped after step 10 ...
    (tmp_path / "r" / "summary.json").unlink()
    run(args + [f"hydra.run.dir={tmp_path / 'r'}"], nproc=1)  # ... and finishes on one process
    full, resumed = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "r"))
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], abs=1e-5)


def test_a_batch_that_does_not_split_is_refused(tmp_path, prepared):
    r = subprocess.run([sys.executable, "-m", "shortcut", "train", *prepared, *TINY, "train.batch_size=3",
                        "train.nproc=2", "train.device=cpu", f"hydra.run.dir={tmp_path / 'x'}"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "cannot be split evenly over train.nproc=2 processes" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("shortcut: error") == 1
