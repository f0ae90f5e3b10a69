"""A corpus is verified where it is read (issue 19): a split truncated, extended or overwritten after prepare is
refused in one line at train start and at eval, runs record the hash of the bytes they read, and prepare rebuilds a
changed corpus instead of calling it up to date."""

import hashlib
import json

import numpy as np
import pytest

from conftest import TINY
from shortcut import corpus, rundir
from shortcut.cli import compose
from shortcut.config import UserError
from shortcut.data import TokenData
from shortcut.evaluate import evaluate
from shortcut.prepare import prepare
from shortcut.train import train


def corpus_of(prepared):
    return corpus.locate(prepared[0].split("=", 1)[1], compose("train", prepared).domain)


def train_job(prepared, *extra):
    return compose("train", prepared + TINY + ["train.max_steps=4", "train.eval_every=2", *extra])


def prepare_job(prepared, tmp_path):
    return compose("prepare", prepared + [f"domain.files={tmp_path / 'texts'}/*.txt"])


def assert_refused(exc_info, name: str):
    message = str(exc_info.value)
    assert "\n" not in message and name in message and "re-run `shortcut prepare`" in message, message


def random_tokens(path, split, vocab: int | None, seed: int = 0):
    """Overwrite the split with random tokens (below vocab, or any 16-bit value), keeping its size."""
    file = path / f"{split}.bin"
    n = file.stat().st_size // 2
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, n) if vocab else rng.integers(0, 2**16, n)
    file.write_bytes(ids.astype(np.uint16).tobytes())


def test_meta_records_each_files_sha256_and_the_content_hash_over_them(prepared):
    path = corpus_of(prepared)
    meta = corpus.read_meta(path)
    assert list(meta["hashes"]) == ["train.bin", "val.bin", "test.bin"]
    total = hashlib.sha256()
    for name, recorded in meta["hashes"].items():
        blob = (path / name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == recorded  # what `sha256sum train.bin` prints
        total.update(blob)
    assert meta["content_hash"] == total.hexdigest()[:16] == corpus.verify(path, meta)


def test_a_truncated_train_split_is_refused_at_train_start(tmp_path, prepared):
    """Before: training ran on the truncated split, exit 0, and summary.json recorded the intact corpus' hash."""
    path = corpus_of(prepared)
    with open(path / "train.bin", "r+b") as f:
        f.truncate(100_000)
    with pytest.raises(UserError) as exc:
        train(train_job(prepared), tmp_path / "run")
    assert_refused(exc, str(path / "train.bin"))
    assert "truncated" in str(exc.value)
    assert not (tmp_path / "run" / rundir.SUMMARY).exists()


def test_a_truncated_test_split_is_refused_at_eval(tmp_path, prepared):
    """Before: eval scored the 4,999 tokens left of 15,000, exit 0, no warning."""
    run = tmp_path / "run"
    train(train_job(prepared), run)
    path = corpus_of(prepared)
    with open(path / "test.bin", "r+b") as f:
        f.truncate(2000)
    with pytest.raises(UserError) as exc:
        evaluate(compose("eval", [f"run_dir={run}"]))
    assert_refused(exc, str(path / "test.bin"))
    assert not (run / rundir.EVAL).exists()


@pytest.mark.parametrize("damage", ["odd size", "extended", "random tokens in the vocabulary", "random bytes"])
def test_a_damaged_split_is_refused_in_one_line(tmp_path, prepared, damage):
    """Before: an odd size gave a numpy traceback, random bytes an IndexError from the embedding, and random
    in-vocabulary tokens of the same size trained without a word."""
    path = corpus_of(prepared)
    vocab = corpus.read_meta(path)["vocab_size"]
    if damage == "odd size":
        with open(path / "val.bin", "ab") as f:
            f.write(b"\0")
    elif damage == "extended":
        with open(path / "val.bin", "ab") as f:
            f.write(b"\0\0" * 10)
    else:
        random_tokens(path, "val", vocab if "vocabulary" in damage else None)
    with pytest.raises(UserError) as exc:
        train(train_job(prepared), tmp_path / "run")
    assert_refused(exc, str(path / "val.bin"))
    with pytest.raises(UserError):
        TokenData(path, 32)


def test_load_split_checks_the_size(prepared):
    path = corpus_of(prepared)
    with open(path / "test.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError) as exc:
        corpus.load_split(path, "test")
    assert_refused(exc, "test.bin")


def test_the_run_records_the_hash_of_the_bytes_it_read_not_metas(tmp_path, prepared):
    """A meta.json whose content_hash no longer describes its files is refused; an intact corpus' hash, as the run
    records it, is the one computed from the files."""
    path = corpus_of(prepared)
    meta_file = path / corpus.META
    meta = json.loads(meta_file.read_text())
    summary = train(train_job(prepared), tmp_path / "run")
    total = hashlib.sha256(b"".join((path / f"{s}.bin").read_bytes() for s in corpus.SPLITS)).hexdigest()[:16]
    assert summary.data_hash == total
    meta_file.write_text(json.dumps({**meta, "content_hash": "0123456789abcdef"}))
    with pytest.raises(UserError) as exc:
        train(train_job(prepared), tmp_path / "other")
    assert_refused(exc, "content_hash")


def test_prepare_rebuilds_a_corpus_whose_split_changed(tmp_path, prepared, caplog):
    """Before: prepare said "up to date" over a train.bin overwritten with random in-vocabulary tokens."""
    path = corpus_of(prepared)
    meta = corpus.read_meta(path)
    random_tokens(path, "train", meta["vocab_size"])
    with caplog.at_level("INFO"):
        assert prepare(prepare_job(prepared, tmp_path)) == path
    assert "preparing" in caplog.text and "train.bin" in caplog.text
    assert hashlib.sha256((path / "train.bin").read_bytes()).hexdigest() == meta["hashes"]["train.bin"]
    assert corpus.verify(path) == meta["content_hash"]
    caplog.clear()
    with caplog.at_level("INFO"):
        prepare(prepare_job(prepared, tmp_path))
    assert "up to date" in caplog.text


def test_a_corpus_prepared_before_per_file_hashes_is_verified_by_its_content_hash(tmp_path, prepared):
    """meta.json without "hashes" (prepared before this check): content_hash, over the splits in order, still
    verifies it; no re-prepare is needed, and a change is still refused."""
    path = corpus_of(prepared)
    meta_file = path / corpus.META
    meta = json.loads(meta_file.read_text())
    del meta["hashes"]
    meta_file.write_text(json.dumps(meta))
    assert corpus.verify(path) == meta["content_hash"]
    assert corpus.up_to_date(path, meta["input_hash"])
    random_tokens(path, "test", meta["vocab_size"])
    with pytest.raises(UserError) as exc:
        TokenData(path, 32)
    assert_refused(exc, "content_hash")
    assert not corpus.up_to_date(path, meta["input_hash"])


def test_an_unreadable_meta_json_is_refused_in_one_line(prepared):
    path = corpus_of(prepared)
    (path / corpus.META).write_text('{"tokens": ')
    with pytest.raises(UserError) as exc:
        TokenData(path, 32)
    assert_refused(exc, str(path / corpus.META))
