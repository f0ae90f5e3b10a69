"""Text corpora: tokenizer round trips, splits, text8/WikiText readers on local copies, atomic and idempotent writes."""

import json
import zipfile

import numpy as np
import pytest

from shortcut import corpus
from shortcut.cli import compose
from shortcut.config import UserError
from shortcut.prepare import prepare
from shortcut.prepare import text as text_mod
from shortcut.prepare.text import ByteTokenizer, CharTokenizer, tokenizer_from_meta

SAMPLE = "Héllo, wörld! ünïcode ✓ 日本語 — tabs\tand\nnewlines.\r\n"


def prep(tmp_path, *overrides):
    return prepare(compose("prepare", [f"data.root={tmp_path / 'data'}", "domain=text", *overrides]))


def test_byte_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert ids.max() < 256 and len(ids) == len(SAMPLE.encode())
    assert tok.decode(ids) == SAMPLE


def test_char_round_trip_and_unknown():
    tok = CharTokenizer.fit(SAMPLE)
    assert tok.chars == sorted(set(SAMPLE))
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    with pytest.raises(ValueError):
        tok.encode("Q")
    unk = tok.with_unk()
    ids = unk.encode("HéQ")
    assert ids[-1] == unk.unk_id and unk.decode(ids) == "Hé" + CharTokenizer.UNK
    assert unk.unknown("HéQQ") == 2


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_files_corpus(tmp_path, text_files, tokenizer):
    out = prep(tmp_path, "domain.source=files", f"domain.files={text_files}/*.txt", f"domain.tokenizer={tokenizer}")
    meta = json.loads((out / "meta.json").read_text())
    assert out.parent == tmp_path / "data" / "text" and out.name.startswith("files-")
    assert meta["settings"]["tokenizer"] == tokenizer and "files" not in meta["settings"]
    text = "\n".join((text_files / f"part{i}.txt").read_text() for i in range(3))
    assert sum(meta["chars"].values()) == len(text)
    assert meta["chars"]["val"] == int(len(text) * 0.05) and meta["chars"]["test"] == int(len(text) * 0.05)
    tok = tokenizer_from_meta(meta)
    decoded = "".join(tok.decode(corpus.load_split(out, s, meta)) for s in corpus.SPLITS)
    assert decoded == text  # the three splits are the text, in order, nothing lost
    assert meta["vocab_size"] == (256 if tokenizer == "byte" else len(set(text[: meta["chars"]["train"]])))
    for key in ("tokens", "chars", "bytes", "source", "tokenizer", "content_hash", "input_hash", "dtype"):
        assert key in meta


def test_prepare_is_idempotent_and_notices_changes(tmp_path, text_files):
    args = ("domain.source=files", f"domain.files={text_files}/*.txt")
    out = prep(tmp_path, *args)
    stamp = (out / "train.bin").stat().st_mtime_ns
    prep(tmp_path, *args)
    assert (out / "train.bin").stat().st_mtime_ns == stamp  # no-op
    (text_files / "part1.txt").write_text("changed " * 2000)
    prep(tmp_path, *args)
    assert (out / "train.bin").stat().st_mtime_ns != stamp
    byte = prep(tmp_path, *args, "domain.tokenizer=byte")
    assert json.loads((byte / "meta.json").read_text())["tokenizer"] == "byte"
    assert byte != out and json.loads((out / "meta.json").read_text())["tokenizer"] == "char"  # both kept


def test_each_setting_has_its_own_corpus_and_train_names_it(tmp_path, text_files):
    """Defect 5: two settings of one source used to share data/<domain>/<source> and overwrite each other, so a
    run's config could name one corpus while it trained on the other."""
    from conftest import TINY
    from shortcut.train import train

    args = ["domain.source=files", f"domain.files={text_files}/*.txt"]
    a, b = prep(tmp_path, *args), prep(tmp_path, *args, "domain.val_frac=0.2")
    assert a != b and (a / "meta.json").is_file() and (b / "meta.json").is_file()
    base = [f"data.root={tmp_path / 'data'}", "domain=text", "domain.source=files", *TINY, "train.max_steps=2"]
    assert train(compose("train", base + ["domain.val_frac=0.2"]), tmp_path / "r").data_dir == str(b)
    assert train(compose("train", base), tmp_path / "r2").data_dir == str(a)
    with pytest.raises(UserError, match=r"no prepared corpus for these domain settings.*domain.val_frac=0.2 "
                                        r"\(yours 0.1\)"):
        train(compose("train", base + ["domain.val_frac=0.1"]), tmp_path / "r3")


def test_interrupted_prepare_leaves_the_old_corpus(tmp_path, text_files, monkeypatch):
    args = ("domain.source=files", f"domain.files={text_files}/*.txt")
    out = prep(tmp_path, *args)
    before = (out / "meta.json").read_text()

    real, calls = np.ascontiguousarray, []

    def dies_on_second_split(*a, **k):  # the first tokens are written, then the process "dies"
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(corpus.np, "ascontiguousarray", dies_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path, *args, "domain.tokenizer=byte")
    assert (out / "meta.json").read_text() == before
    assert corpus.read_meta(out)["tokenizer"] == "char"
    # A first prepare that dies leaves nothing that looks like a corpus: only the hidden work folder.
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path / "other", *args)
    job = compose("prepare", [f"data.root={tmp_path / 'other' / 'data'}", "domain=text", *args])
    with pytest.raises(UserError, match="no prepared corpus"):
        corpus.locate(job.data.root, job.domain)
    partial = corpus.corpus_dir(job.data.root, job.domain)
    assert not partial.exists() and (partial.parent / f".{partial.name}.partial").is_dir()


def test_text8_from_local_zip(tmp_path):
    text = " ".join(["anarchism originated as a term of abuse"] * 300)
    zpath = tmp_path / "text8.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("text8", text)
    out = prep(tmp_path, "domain.source=text8", f"domain.path={zpath}")
    meta = corpus.read_meta(out)
    n = len(text)
    assert meta["chars"] == {"train": n - 2 * int(n * 0.05), "val": int(n * 0.05), "test": int(n * 0.05)}
    assert meta["vocab_size"] == len(set(text))  # the real text8 gives 27: a-z and space
    # the unzipped file gives the same corpus
    (tmp_path / "text8").write_text(text)
    out2 = prepare(compose("prepare", [f"data.root={tmp_path / 'd2'}", "domain.source=text8",
                                       f"domain.path={tmp_path / 'text8'}"]))
    assert corpus.read_meta(out2)["content_hash"] == meta["content_hash"]


def test_wikitext_from_local_raw_files(tmp_path):
    folder = tmp_path / "wikitext-103-raw"
    folder.mkdir()
    for name, body in [("wiki.train.raw", " = Valkyria = \n Senjō no Valkyria 3 \n" * 50),
                       ("wiki.valid.raw", " = Homarus = \n lobster \n" * 20), ("wiki.test.raw", " = Robert = \n x \n" * 20)]:
        (folder / name).write_text(body)
    out = prep(tmp_path, "domain.source=wikitext103", f"domain.path={tmp_path}")
    meta = corpus.read_meta(out)
    assert meta["chars"]["val"] == len(" = Homarus = \n lobster \n" * 20)
    assert meta["unk"] is True and meta["unknown_chars"]["val"] > 0  # 'H' never appears in train


def test_offline_downloads_fail_fast_naming_files(tmp_path, monkeypatch):
    monkeypatch.setattr(text_mod, "TEXT8_URL", "http://127.0.0.1:9/text8.zip")  # nothing listens there
    with pytest.raises(UserError, match="domain.source=files"):
        prep(tmp_path, "domain.source=text8")
    monkeypatch.setattr(text_mod, "require_network",
                        lambda *a, **k: (_ for _ in ()).throw(UserError("offline; use domain.source=files")))
    with pytest.raises(UserError, match="domain.source=files"):
        prep(tmp_path, "domain.source=wikitext103")


@pytest.mark.parametrize("overrides,match", [
    (["domain.source=files"], "domain.files"),
    (["domain.source=files", "domain.files=/nonexistent/*.txt"], "matches no files"),
    (["domain.source=text8", "domain.path=/nonexistent/text8.zip"], "not a file"),
    (["domain.source=wikitext103", "domain.path=/nonexistent"], "must be a folder"),
])
def test_bad_sources(tmp_path, overrides, match):
    with pytest.raises(UserError, match=match):
        prep(tmp_path, *overrides)


def test_non_utf8_file_is_named(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(UserError, match=r"no usable text left: 1 file\(s\) skipped, e.g. .*latin1.txt: not UTF-8"):
        prep(tmp_path, "domain.source=files", f"domain.files={bad}")
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text \(bad byte at offset 3\).*domain.on_error=skip"):
        prep(tmp_path, "domain.source=files", f"domain.files={bad}", "domain.on_error=fail")
