"""Issue 19, item 6: a full disk (or any OS write error) gives one line naming the path and what was written, and
leaves no partial file behind: prepare's .partial/ corpus, a checkpoint's .tmp, an atomic file's temporary."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY
from shortcut import corpus, diskio, rundir
from shortcut.cli import compose
from shortcut.train import train


class FillingFile:
    """A file object whose writes fail with ENOSPC once `budget` bytes have gone through (shared by all files)."""

    def __init__(self, f, budget: list):
        self._f, self._budget = f, budget

    def write(self, data):
        n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data)
        if self._budget[0] < n:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget[0] -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_after(monkeypatch, module, nbytes: int) -> None:
    budget = [nbytes]
    monkeypatch.setattr(module, "open", lambda *a, **k: FillingFile(open(*a, **k), budget), raising=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".partial" in p.name or ".tmp" in p.name)


def splits(n: int) -> dict:
    rng = np.random.default_rng(0)
    return {s: rng.integers(0, 50, n, dtype=np.uint16) for s in corpus.SPLITS}


@pytest.mark.parametrize("budget", [10, 30_000, 100_000], ids=["at-once", "in-train", "in-test"])
def test_a_corpus_that_does_not_fit_leaves_nothing_and_says_so(tmp_path, monkeypatch, budget):
    fill_after(monkeypatch, corpus, budget)  # the split files fill the disk
    with pytest.raises(diskio.DiskError) as e:
        corpus.write_corpus(tmp_path / "c", splits(20_000), {"vocab_size": 50, "tokenizer": "char"})
    message = str(e.value)
    assert "\n" not in message and "no space left on" in message and str(tmp_path / "c") in message
    assert "partial files" in message and "were removed" in message
    assert not (tmp_path / "c").exists() and leftovers(tmp_path) == []


def test_a_journal_write_that_fails_leaves_nothing(tmp_path, monkeypatch):
    fill_after(monkeypatch, diskio, 0)  # the journal and meta.json fill the disk (atomic writes)
    with pytest.raises(diskio.DiskError) as e:
        corpus.write_corpus(tmp_path / "c", splits(100), {"vocab_size": 50, "tokenizer": "char"})
    assert "no space left on" in str(e.value)
    assert not (tmp_path / "c").exists() and leftovers(tmp_path) == []


def test_an_atomic_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    rundir.write_json(target, {"old": 1})
    fill_after(monkeypatch, diskio, 5)
    with pytest.raises(diskio.DiskError) as e:
        rundir.write_json(target, {"new": list(range(100))})
    assert str(target) in str(e.value) and "about 0.1 MB needed" in str(e.value)
    assert target.read_text() == '{\n  "old": 1\n}' and leftovers(tmp_path) == []


def test_other_write_errors_name_the_path_and_the_reason(tmp_path, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(diskio, "open", read_only, raising=False)
    with pytest.raises(diskio.DiskError, match=r"could not write summary.json to .*: Read-only file system"):
        rundir.write_json(tmp_path / "summary.json", {})


def test_other_os_errors_are_not_disguised_as_disk_errors(tmp_path):
    with pytest.raises(FileNotFoundError):  # a missing folder is the caller's bug, not a full disk
        rundir.write_json(tmp_path / "no" / "such" / "eval.json", {})


@pytest.fixture
def ckpt():
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    return rundir.Checkpoint(step=7, model=model.state_dict(), optimizer=opt.state_dict(), rng={}, best_val_loss=1.0,
                             last_val_loss=1.0, train_loss=1.0, train_time=0.0, wall_time=0.0, config={},
                             model_config={}, data_hash="", data_dir="")


def test_a_checkpoint_is_refused_before_writing_when_the_disk_has_less_than_it_needs(tmp_path, monkeypatch, ckpt):
    monkeypatch.setattr(diskio, "free_bytes", lambda path: 1000)
    with pytest.raises(diskio.DiskError) as e:
        ckpt.save(tmp_path / "ckpt", keep=2)
    assert "step-7 checkpoint" in str(e.value) and "1.0 MB needed" in str(e.value)  # 64x64 weights + Adam + 1 MB
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_a_checkpoint_cut_short_by_the_disk_leaves_no_tmp(tmp_path, monkeypatch, ckpt):
    def torch_save_on_a_full_disk(obj, f):  # what torch's zip writer raises when the disk fills mid-file
        Path(f).write_bytes(b"PK" * 100)
        monkeypatch.setattr(diskio, "free_bytes", lambda path: 0)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(diskio.DiskError, match="no space left on .* writing the step-7 checkpoint"):
        ckpt.save(tmp_path / "ckpt", keep=2)
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_train_on_a_full_disk_stops_in_one_line(tmp_path, prepared, monkeypatch):
    monkeypatch.setattr(diskio, "free_bytes", lambda path: 1000)
    with pytest.raises(diskio.DiskError, match="no space left on .* checkpoint"):
        train(compose("train", prepared + TINY + ["train.max_steps=4"]), tmp_path / "run")
    assert leftovers(tmp_path / "run") == []


def test_the_cli_reports_an_unguarded_disk_error_in_one_line(tmp_path):
    """A write no module guards (e.g. a plotting library's) still ends in one line, not a traceback."""
    code = ("import errno, shortcut.prepare as p\n"
            f"def full(job): raise OSError(errno.ENOSPC, 'No space left on device', {str(tmp_path / 'out.png')!r})\n"
            "p.prepare = full\n"
            "from shortcut.cli import main\n"
            f"main(['prepare', 'data.root={tmp_path}'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"no space left on {diskio.mount_of(tmp_path)} writing output to {tmp_path / 'out.png'}" in r.stderr


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MB file system (needs root and tmpfs; skipped elsewhere)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_real_full_tmpfs(tiny_tmpfs):
    with pytest.raises(diskio.DiskError) as e:
        corpus.write_corpus(tiny_tmpfs / "c", splits(300_000), {"vocab_size": 50, "tokenizer": "char"})
    assert f"no space left on {tiny_tmpfs} writing the corpus" in str(e.value)
    assert list(tiny_tmpfs.iterdir()) == [tiny_tmpfs / ".c.lock"]  # the lock file is empty; the space is back
    corpus.write_corpus(tiny_tmpfs / "c", splits(10_000), {"vocab_size": 50, "tokenizer": "char"})  # still usable
