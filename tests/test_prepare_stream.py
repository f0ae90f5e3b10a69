"""Streaming prepare (issue 14): byte ranges that cut nothing, 1 and 2 workers byte-identical, corrupt and missing
inputs counted and named, up-to-date checks that read no input, resume after an interruption and after kill -9,
LibriSpeech subsets as lists, downloads through pooch with checksums and resume."""

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import soundfile as sf
import torch

from shortcut import corpus
from shortcut.cli import compose
from shortcut.config import UserError
from shortcut.download import download
from shortcut.prepare import audio as audio_mod
from shortcut.prepare import common
from shortcut.prepare import prepare
from shortcut.prepare import text as text_mod
from shortcut.prepare.audio import FrameSample
from test_audio import librispeech, sound
from test_music import write_piece

MIXED = "Ünïcödé — 日本語 and 🎹 emoji,\r\nCR LF lines\rand a lone CR, tabs\tand plain ASCII text. " * 40


def prep(root, domain, *overrides):
    return prepare(compose("prepare", [f"data.root={root}", f"domain={domain}", *overrides]))


def split_bytes(out):
    return {s: (out / f"{s}.bin").read_bytes() for s in corpus.SPLITS}


# --- text ---

def test_text_ranges_and_workers_give_the_same_corpus(tmp_path, monkeypatch):
    from conftest import english_like

    text_files = tmp_path / "texts"
    text_files.mkdir()
    (text_files / "a.txt").write_text(english_like(300), encoding="utf-8")
    (text_files / "b.txt").write_bytes(MIXED.encode("utf-8"))
    (text_files / "c.txt").write_bytes(b"")
    args = ["domain.source=files", f"domain.files={text_files}/*.txt"]
    for tokenizer in ("char", "byte"):
        one = prep(tmp_path / "one", "text", *args, f"domain.tokenizer={tokenizer}", "prepare.workers=1")
        with monkeypatch.context() as m:  # tiny ranges (cut inside lines, near multi-byte characters), 2 workers
            m.setattr(text_mod, "SMALL", 0)
            m.setattr(text_mod, "range_bytes", lambda opts, workers: 11)
            two = prep(tmp_path / "two", "text", *args, f"domain.tokenizer={tokenizer}", "prepare.workers=2",
                       "prepare.max_memory_mb=512")
        assert one.name == two.name  # prepare.* settings are not corpus settings
        assert split_bytes(one) == split_bytes(two)
        meta = corpus.read_meta(two)
        assert meta["content_hash"] == corpus.read_meta(one)["content_hash"]
        tok = text_mod.tokenizer_from_meta(meta)
        text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(text_files.glob("*.txt")))
        decoded = "".join(tok.decode(corpus.load_split(two, s, meta)) for s in corpus.SPLITS)
        assert decoded == text  # newlines as text mode reads them; no character cut or lost
        assert sum(meta["bytes"].values()) == len(text.encode("utf-8"))


def test_text_skips_non_utf8_and_binary_files(tmp_path, text_files):
    (text_files / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (text_files / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    out = prep(tmp_path, "text", "domain.source=files", f"domain.files={text_files}/*.txt")
    meta = corpus.read_meta(out)
    assert meta["n_skipped"] == 2
    assert "not UTF-8 text (bad byte at offset 3)" in meta["skipped"][str(text_files / "latin1.txt")]
    assert "binary" in meta["skipped"][str(text_files / "image.txt")]
    good = "\n".join((text_files / f"part{i}.txt").read_text() for i in range(3))
    assert sum(meta["chars"].values()) == len(good)
    with pytest.raises(UserError, match=r"image.txt: binary, not text .*domain.on_error=skip"):
        prep(tmp_path, "text", "domain.source=files", f"domain.files={text_files}/*.txt", "domain.on_error=fail")


def test_up_to_date_reads_no_input(tmp_path, text_files, monkeypatch):
    args = ("domain.source=files", f"domain.files={text_files}/*.txt")
    out = prep(tmp_path, "text", *args)
    stamp = (out / "train.bin").stat().st_mtime_ns

    def no_reading(*a, **k):
        raise AssertionError("an up-to-date check read an input")

    monkeypatch.setattr(text_mod, "read_codes", no_reading)
    prep(tmp_path, "text", *args, "domain.on_error=fail", "prepare.workers=1")  # neither setting shapes the corpus
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    os.utime(text_files / "part1.txt", ns=(time.time_ns(), time.time_ns()))  # a new mtime: the inputs changed
    with pytest.raises(AssertionError, match="read an input"):
        prep(tmp_path, "text", *args, "prepare.workers=1")


def dies_at_call(monkeypatch, module, name: str, n: int):
    """module.name (a worker's job function) raises KeyboardInterrupt on its n-th call, as a killed prepare would
    stop. Returns the real function and the list of arguments it was called with."""
    real, calls = getattr(module, name), []

    def dies(job):
        calls.append(job)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(module, name, dies)
    return real, calls


def test_text_resumes_after_an_interruption(tmp_path, text_files, monkeypatch, caplog):
    args = ("domain.source=files", f"domain.files={text_files}/*.txt", "prepare.workers=1")
    whole = prep(tmp_path / "whole", "text", *args)
    monkeypatch.setattr(common.Committer, "SECONDS", 0.0)
    real, calls = dies_at_call(monkeypatch, text_mod, "_encode", 2)  # the second of 3 ranges
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path / "cut", "text", *args)
    calls.clear()
    monkeypatch.setattr(text_mod, "_encode", lambda job: (calls.append(job), real(job))[1])
    with caplog.at_level("INFO"):
        out = prep(tmp_path / "cut", "text", *args)
    assert "resuming" in caplog.text and len(calls) == 2  # of 3 ranges, the first was not read again
    assert split_bytes(out) == split_bytes(whole)
    assert corpus.read_meta(out)["content_hash"] == corpus.read_meta(whole)["content_hash"]
    assert not (out.parent / f".{out.name}.partial").exists()


# --- audio ---

@pytest.fixture
def speech(tmp_path):
    """18 short utterances from 6 speakers, and a corrupt one."""
    folder = tmp_path / "speech"
    folder.mkdir()
    for spk in range(6):
        for utt in range(3):
            x = np.concatenate([sound(["tone", "chirp", "noise"][(spk + utt) % 3], 0.5, 16000, spk),
                                sound("silence", 0.1, 16000)])
            sf.write(folder / f"{200 + spk}-3-{utt:04d}.wav", x, 16000)
    (folder / "999-3-0000.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return folder


def test_audio_resumes_without_fitting_again(tmp_path, speech, monkeypatch, caplog):
    args = ("domain.source=files", f"domain.files={speech}", "domain.codebook_size=8", "prepare.workers=1")
    whole = prep(tmp_path / "whole", "audio", *args)
    monkeypatch.setattr(common.Committer, "SECONDS", 0.0)
    real, calls = dies_at_call(monkeypatch, audio_mod, "_tokenize", 6)  # the sixth file
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path / "cut", "audio", *args)
    monkeypatch.setattr(audio_mod, "_tokenize", real)
    monkeypatch.setattr(audio_mod, "kmeans_fit", lambda *a, **k: pytest.fail("the codebook was fitted again"))
    with caplog.at_level("INFO"):
        out = prep(tmp_path / "cut", "audio", *args)
    assert "resuming" in caplog.text
    for name in ("train.bin", "val.bin", "test.bin", "codebook.npy"):
        assert (out / name).read_bytes() == (whole / name).read_bytes()
    meta = corpus.read_meta(out)
    assert meta["n_skipped"] == 1 and list(meta["skipped"]) == [str(speech / "999-3-0000.wav")]


def alive(pid) -> bool:
    try:
        return "\tZ" not in open(f"/proc/{pid}/status").read().split("State:")[1][:4]
    except OSError:
        return False


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


KILL_SCRIPT = """
import sys, time
from shortcut.cli import compose
from shortcut.prepare import audio, common, prepare
common.Committer.SECONDS = 0.0
real = audio._tokenize
def slow(path):
    time.sleep(0.15)
    return real(path)
audio._tokenize = slow
prepare(compose("prepare", sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_prepare_then_resume_is_byte_identical(tmp_path, speech):
    args = ["domain=audio", "domain.source=files", f"domain.files={speech}", "domain.codebook_size=8"]
    whole = prepare(compose("prepare", [f"data.root={tmp_path / 'whole'}", *args, "prepare.workers=1"]))
    script = tmp_path / "slow_prepare.py"
    script.write_text(KILL_SCRIPT)
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), f"data.root={root}", *args, "prepare.workers=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = root / "audio" / f".{whole.name}.partial" / corpus.JOURNAL
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads(journal.read_text())["done"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 4:
            break
        time.sleep(0.05)
    children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= done < 17, "the prepare was not caught half-way"
    out = root / "audio" / whole.name
    assert not out.exists()  # half-written: never mistaken for a corpus
    with pytest.raises(UserError, match="no prepared corpus"):
        corpus.locate(root, compose("prepare", args).domain)
    assert children and wait_until(lambda: not [c for c in children if alive(c)])  # the workers died with it
    resumed = prepare(compose("prepare", [f"data.root={root}", *args, "prepare.workers=2"]))
    for name in ("train.bin", "val.bin", "test.bin", "codebook.npy"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes()


def test_frame_sample_is_uniform_and_independent_of_order():
    rng = np.random.default_rng(0)
    utts = {f"u{i}": rng.standard_normal((40 + i, 3)).astype(np.float32) for i in range(10)}
    a, b = FrameSample(50, seed=3), FrameSample(50, seed=3)
    for name in utts:
        a.add(name, utts[name])
    for name in reversed(list(utts)):
        b.add(name, utts[name])
    assert torch.equal(a.result(), b.result()) and a.result().shape == (50, 3)
    small = FrameSample(10_000, seed=3)
    for name, x in utts.items():
        small.add(name, x)
    assert small.result().shape == (sum(len(x) for x in utts.values()), 3)  # fewer frames than k: all of them


def test_librispeech_subsets_missing_and_corrupt_files(tmp_path):
    root = librispeech(tmp_path / "LibriSpeech", {"train-clean-100": [19, 26], "train-clean-360": [100, 101],
                                                  "dev-clean": [84], "test-clean": [61]})
    (root / "train-clean-360/100/77/100-77-0001.flac").unlink()  # listed in its transcript: missing audio
    (root / "train-clean-360/101/77/101-77-0001.flac").write_bytes(b"fLaC broken")  # corrupt
    sf.write(root / "dev-clean/84/77/84-77-0009.flac", sound("tone", 0.3, 16000), 16000)  # no transcript line
    args = ["domain.source=librispeech", f"domain.path={tmp_path}", "domain.codebook_size=8",
            "domain.train_subsets=[train-clean-100,train-clean-360]"]
    out = prep(tmp_path / "data", "audio", *args)
    meta = corpus.read_meta(out)
    assert meta["files"] == {"train": 6, "val": 3, "test": 2}  # 8 train utterances, one missing, one corrupt
    assert meta["n_missing"] == {"train/audio": 1, "val/transcript": 1}
    assert meta["missing"]["train/audio"] == [str(root / "train-clean-360/100/77/100-77-0001.flac")]
    assert list(meta["skipped"]) == [str(root / "train-clean-360/101/77/101-77-0001.flac")]
    assert meta["n_transcripts"] == 11  # the utterances read whose transcript line is there (the corrupt one too)
    with pytest.raises(UserError, match=r"1 audio file\(s\) of the train split are missing, e.g. .*100-77-0001.flac"):
        prep(tmp_path / "data", "audio", *args, "domain.on_error=fail")
    with pytest.raises(ValueError, match="a subset is named twice"):
        compose("prepare", ["domain=audio", "domain.val_subsets=[dev-clean]", "domain.test_subsets=[dev-clean]"])


def test_maestro_folder_with_missing_and_corrupt_files(tmp_path):
    folder = tmp_path / "maestro-v3.0.0"
    (folder / "2018").mkdir(parents=True)
    rows = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
    for i, split in enumerate(["train"] * 5 + ["validation"] * 2 + ["test"] * 2):
        rows.append(f"Liszt,Piece {i},{split},2018,2018/p{i}.midi,2018/p{i}.wav,9.0")
        if i not in (1, 7):  # listed but absent: an interrupted extraction
            write_piece(folder / "2018" / f"p{i}.midi", seed=i, tracks=1)
    (folder / "2018" / "p2.midi").write_bytes(b"MThd\x00\x00\x00\x06 broken")
    (folder / "maestro-v3.0.0.csv").write_text("\n".join(rows) + "\n")
    out = prep(tmp_path / "data", "maestro", f"domain.path={folder}")
    meta = corpus.read_meta(out)
    assert meta["pieces"] == {"train": 3, "val": 2, "test": 1}
    assert meta["n_missing"] == {"train": 1, "test": 1} and meta["n_skipped"] == 1
    with pytest.raises(UserError, match=r"^1 MIDI file\(s\) of the train split are missing, e.g. .*p1.midi"):
        prep(tmp_path / "data", "maestro", f"domain.path={folder}", "domain.on_error=fail")
    for i in (5, 6):
        (folder / "2018" / f"p{i}.midi").unlink()
    with pytest.raises(UserError, match="no usable MIDI left for the val split"):
        prep(tmp_path / "data", "maestro", f"domain.path={folder}")


# --- downloads ---

@pytest.fixture
def server():
    """A local HTTP server that honours Range requests; yields (base url, {path: bytes}, [range starts asked])."""
    files, ranges = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = files.get(self.path)
            if data is None:
                self.send_response(404)
                self.end_headers()
                return
            start = 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].split("=")[1].split("-")[0])
                ranges.append(start)
                if start >= len(data):
                    self.send_response(416)
                    self.end_headers()
                    return
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files, ranges
    httpd.shutdown()


def test_download_checks_the_checksum_and_resumes(tmp_path, server):
    base, files, ranges = server
    buf = tmp_path / "text8.zip"
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("text8", " anarchism originated as a term of abuse" * 2000)
    data = buf.read_bytes()
    files["/text8.zip"] = data
    sha = "sha256:" + hashlib.sha256(data).hexdigest()
    dest = tmp_path / "cache" / "text8.zip"
    with pytest.raises(UserError, match="does not match its published checksum.*domain.path"):
        download(f"{base}/text8.zip", dest, "text8", "Use domain.path=text8.zip.", known_hash="sha256:" + "0" * 64)
    assert not dest.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "text8.zip.part").write_bytes(data[:1000])  # an interrupted earlier download
    assert download(f"{base}/text8.zip", dest, "text8", "", known_hash=sha).read_bytes() == data
    assert ranges == [1000]  # it asked only for the rest
    with pytest.raises(UserError, match="failed .*Use the local copy"):
        download(f"{base}/missing.zip", tmp_path / "cache" / "m.zip", "m", "Use the local copy.")


def test_text8_download_through_the_cache(tmp_path, server, monkeypatch):
    base, files, _ = server
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as z:
        z.writestr("text8", " the quick brown fox jumps over the lazy dog" * 500)
    files["/text8.zip"] = (tmp_path / "text8.zip").read_bytes()
    monkeypatch.setattr(text_mod, "TEXT8_URL", f"{base}/text8.zip")
    downloaded = prep(tmp_path / "d", "text", "domain.source=text8")
    local = prep(tmp_path / "l", "text", "domain.source=text8", f"domain.path={tmp_path / 'text8.zip'}")
    assert split_bytes(downloaded) == split_bytes(local)
    assert (tmp_path / "d" / "downloads" / "text8.zip").is_file()


def test_one_prepare_at_a_time(tmp_path):
    with corpus.CorpusWriter(tmp_path / "text" / "files-x", "h"):
        code = (f"from shortcut import corpus\ncorpus.CorpusWriter({str(tmp_path / 'text' / 'files-x')!r}, 'h')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "another `shortcut prepare` is writing" in done.stderr
