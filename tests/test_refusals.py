"""Issue 19, items 5, 7, 8, 9: a refused train leaves its run dir as it was; sample keeps the earlier samples until
the new ones are complete and refuses lengths that cannot fit; eval says which step of how many it scored and
names what it skipped; messages that say what happened."""

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from shortcut import sample as sample_mod
from shortcut.cli import compose
from shortcut.config import UserError
from shortcut.evaluate import evaluate
from shortcut.sample import sample
from shortcut.train import train


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "shortcut.cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_a_refused_train_writes_nothing_into_the_run_dir(tmp_path, prepared):
    run = tmp_path / "D"
    common = ["train", *prepared, *TINY, "train.max_steps=10", f"hydra.run.dir={run}"]
    assert cli(*common).returncode == 0
    before = snapshot(run)
    assert ".hydra/config.yaml" in before
    other = cli(*common, "train.lr=0.5", "seed=7")  # other settings in the same dir: refused
    assert other.returncode != 0 and "other settings" in other.stderr and "Traceback" not in other.stderr
    with open(run / ".lock", "a+") as held:  # another trainer holds the run dir
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = cli(*common, "train.max_steps=20")
    assert busy.returncode != 0 and "another `shortcut train` is running" in busy.stderr
    assert snapshot(run) == before  # .hydra/ still says seed 0 and the default lr; train.log, config.yaml as they were


@pytest.fixture
def trained(tmp_path, prepared):
    run = tmp_path / "r"
    train(compose("train", prepared + TINY + ["train.max_steps=20"]), run)
    return run


def sample_cfg(run, *extra):
    return compose("sample", [f"run_dir={run}", "sample.n=2", "sample.max_new_tokens=10", *extra])


def test_an_interrupted_sample_keeps_the_earlier_samples(trained, monkeypatch):
    sample(sample_cfg(trained))
    before = snapshot(trained / "samples")

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_mod, "generate", interrupted)
    with pytest.raises(UserError, match="interrupted; .* still holds the earlier samples"):
        sample(sample_cfg(trained, "sample.seed=3"))
    assert snapshot(trained / "samples") == before
    assert [p.name for p in trained.iterdir() if p.name.startswith(".samples")] == []  # no partial folder left
    monkeypatch.undo()
    record = sample(sample_cfg(trained, "sample.seed=3"))  # a complete new set replaces them
    assert json.loads((trained / "samples" / "samples.json").read_text())["settings"]["seed"] == 3
    assert len(record["samples"]) == 2


def test_an_absurd_length_is_refused_before_anything_changes(trained):
    sample(sample_cfg(trained))
    before = snapshot(trained / "samples")
    with pytest.raises(UserError, match=r"sample.max_new_tokens=1,000,000,000,000 .* needs about .* GiB"):
        sample(sample_cfg(trained, "sample.max_new_tokens=1000000000000"))
    assert snapshot(trained / "samples") == before


def test_eval_of_an_unfinished_run_says_which_step_it_scored(tmp_path, prepared, caplog):
    run = tmp_path / "runs" / "killed"
    train(compose("train", prepared + TINY + ["train.max_steps=40", "train.ckpt_every=10", "train.keep_ckpts=4"]), run)
    (run / "summary.json").unlink()  # as if killed after step 20 (its two newer checkpoints gone too)
    for p in sorted((run / "ckpt").glob("step_*.pt"))[-2:]:
        p.unlink()  # newest left: step 20
    done = tmp_path / "runs" / "done"
    train(compose("train", prepared + TINY + ["train.max_steps=10"]), done)
    results = evaluate(compose("eval", [f"run_dir={tmp_path / 'runs'}", "eval.audit=false"]))
    assert list(results) == [str(done)] or list(map(str, results)) == [str(done)]
    assert "killed: skipped: unfinished: its newest checkpoint is step 20 of 40" in caplog.text
    caplog.clear()
    record = evaluate(compose("eval", [f"run_dir={run}", "eval.audit=false"]))
    assert record["checkpoint_step"] == 20 and record["max_steps"] == 40 and record["finished"] is False
    assert "is unfinished: scored its checkpoint at step 20 of 40" in caplog.text
    assert json.loads((run / "eval.json").read_text())["finished"] is False
    finished = evaluate(compose("eval", [f"run_dir={done}", "eval.audit=false"]))
    assert finished["finished"] is True and finished["checkpoint_step"] == finished["max_steps"] == 10


def test_a_checkpoint_from_another_run_is_named_as_such(tmp_path, prepared):
    a, b = tmp_path / "a", tmp_path / "b"
    train(compose("train", prepared + TINY + ["train.max_steps=20"]), a)
    train(compose("train", prepared + TINY + ["train.max_steps=20", "seed=1"]), b)
    for p in (a / "ckpt").glob("step_*.pt"):
        p.write_bytes((b / "ckpt" / p.name).read_bytes())
    with pytest.raises(UserError, match=r"checkpoint at step 20 of .* is not this run's checkpoint") as err:
        evaluate(compose("eval", [f"run_dir={a}", "eval.audit=false"]))
    assert "the newest readable one is step 20" not in str(err.value)


def test_a_maestro_split_of_missing_files_says_they_are_missing(tmp_path):
    import zipfile

    from test_music import prep, write_piece

    rows = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
    for i, split in enumerate(["train"] * 4 + ["validation", "test", "test"]):
        rows.append(f"Chopin,Etude {i},{split},2018,2018/p{i}.midi,2018/p{i}.wav,10.0")
    with zipfile.ZipFile(tmp_path / "maestro.zip", "w") as z:
        z.writestr("maestro-v3.0.0/maestro-v3.0.0.csv", "\n".join(rows) + "\n")
        for i in range(5):  # the test split's two files are not in the archive
            write_piece(tmp_path / f"p{i}.mid", seed=i, tracks=1)
            z.write(tmp_path / f"p{i}.mid", f"maestro-v3.0.0/2018/p{i}.midi")
    with pytest.raises(UserError) as err:
        prep(tmp_path, "domain=maestro", f"domain.path={tmp_path / 'maestro.zip'}")
    text = str(err.value)
    assert "no usable MIDI left for the test split(s)" in text and "2 file(s) the dataset lists are missing" in text
    assert "p5.midi" in text and "MAESTRO" in text and "0 file(s) skipped" not in text
