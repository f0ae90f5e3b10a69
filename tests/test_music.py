"""Music: MIDI the tests write (multi-track, drums, tempo changes, empty, corrupt), miditok tokenizers and BPE,
splits by piece, skip-and-report, round trips, the music21 corpus, and a smoke training on the result."""

import json
import random

import numpy as np
import pytest

from conftest import TINY
from shortcut import corpus
from shortcut.cli import compose
from shortcut.config import UserError
from shortcut.evaluate import evaluate
from shortcut.prepare import prepare
from shortcut.prepare.common import split_whole
from shortcut.prepare.music import encode_piece, load_tokenizer
from shortcut.train import train


def write_piece(path, seed, tracks=2, tempo_change=False, drums=False, bars=8):
    from symusic import Note, Score, Tempo, TimeSignature, Track

    rng = random.Random(seed)
    score = Score(480)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    score.tempos.append(Tempo(0, 100.0 + seed))
    if tempo_change:
        score.tempos.append(Tempo(480 * 8, 70.0))
    for k in range(tracks):
        track = Track(name=f"part{k}", program=[0, 40, 73][k % 3], is_drum=False)
        t = 0
        while t < bars * 4 * 480:
            dur = rng.choice([240, 480, 960])
            track.notes.append(Note(t, dur, rng.randint(48, 84) - 12 * k, rng.randint(50, 110)))
            t += dur
        score.tracks.append(track)
    if drums:
        kit = Track(name="drums", program=0, is_drum=True)
        for beat in range(bars * 4):
            kit.notes.append(Note(beat * 480, 120, rng.choice([36, 38, 42]), 100))
        score.tracks.append(kit)
    score.dump_midi(str(path))
    return path


def type0_midi() -> bytes:
    """A format-0 file written byte by byte: one track, piano on channel 0 and drums on channel 9."""
    events = b""
    for i in range(16):
        pitch = 60 + (i * 5) % 12
        events += b"\x00\x90" + bytes([pitch, 90]) + b"\x00\x99\x24\x64"  # note on (ch 0), kick (ch 9)
        events += b"\x83\x60\x80" + bytes([pitch, 0]) + b"\x00\x89\x24\x00"  # 480 ticks later: both off
    events += b"\x00\xff\x2f\x00"
    return (b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0" + b"MTrk" + len(events).to_bytes(4, "big")
            + events)


@pytest.fixture
def midi_folder(tmp_path):
    folder = tmp_path / "midi"
    (folder / "nested").mkdir(parents=True)
    for i in range(10):
        write_piece(folder / f"piece{i:02d}.mid", seed=i, tracks=1 + i % 3, tempo_change=i % 4 == 0,
                    drums=i % 5 == 0)
    write_piece(folder / "nested" / "deep.midi", seed=99)
    (folder / "type0.mid").write_bytes(type0_midi())
    from symusic import Score

    Score(480).dump_midi(str(folder / "empty.mid"))
    (folder / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06 this is not midi")
    return folder


def prep(tmp_path, *overrides):
    return prepare(compose("prepare", [f"data.root={tmp_path / 'data'}", "domain=music", *overrides]))


@pytest.mark.parametrize("tokenizer", ["REMI", "TSD", "MIDILike", "Structured"])
def test_tokenizers_split_by_piece_and_skip_bad_files(tmp_path, midi_folder, tokenizer):
    out = prep(tmp_path, "domain.source=files", f"domain.files={midi_folder}", f"domain.tokenizer={tokenizer}",
               "domain.use_velocities=true", "domain.use_tempos=true")
    meta = corpus.read_meta(out)
    assert meta["tokenizer"] == tokenizer and (out / "tokenizer.json").is_file()
    assert sorted(meta["skipped"]) == sorted(str(midi_folder / n) for n in ("corrupt.mid", "empty.mid"))
    assert sum(meta["pieces"].values()) == 12 and meta["pieces"]["val"] >= 1 and meta["pieces"]["test"] >= 1
    assert meta["units"]["note"] == meta["notes"] and all(n > 0 for n in meta["notes"].values())
    tok = load_tokenizer(out)
    assert len(tok) == meta["vocab_size"]
    for split in corpus.SPLITS:  # every piece is whole: as many BOS as EOS as pieces, never cut
        ids = np.asarray(corpus.load_split(out, split, meta))
        assert (ids == tok["BOS_None"]).sum() == (ids == tok["EOS_None"]).sum() == meta["pieces"][split]
        assert ids[0] == tok["BOS_None"] and ids[-1] == tok["EOS_None"]


def test_split_is_by_file_and_deterministic(tmp_path):
    paths = [tmp_path / f"p{i}.mid" for i in range(20)]
    a = split_whole(paths, 0.1, 0.1)
    b = split_whole(list(reversed(paths)), 0.1, 0.1)
    assert a == b and len(a["val"]) == 2 and len(a["test"]) == 2
    assert not set(a["train"]) & set(a["val"]) and not set(a["val"]) & set(a["test"])
    c = split_whole(paths + [tmp_path / "new.mid"], 0.1, 0.1)  # adding a piece moves at most a few
    assert len(set(a["train"]) - set(c["train"])) <= 1


def test_round_trip_tokens_midi_tokens(tmp_path, midi_folder):
    from symusic import Score

    out = prep(tmp_path, "domain.source=files", f"domain.files={midi_folder}/piece0*.mid")
    tok = load_tokenizer(out)
    for name in ("piece00.mid", "piece04.mid", "piece05.mid"):  # tempo change; drums
        ids = encode_piece(tok, Score(str(midi_folder / name)))
        decoded = tok.decode(ids[1:-1])
        path = tmp_path / "back.mid"
        decoded.dump_midi(str(path))
        assert encode_piece(tok, Score(str(path))) == ids


def test_bpe_is_learned_on_train_only(tmp_path, midi_folder):
    base = prep(tmp_path, "domain.source=files", f"domain.files={midi_folder}")
    base_meta = corpus.read_meta(base)
    out = prepare(compose("prepare", [f"data.root={tmp_path / 'bpe'}", "domain=music", "domain.source=files",
                                      f"domain.files={midi_folder}", "domain.bpe_vocab=600"]))
    meta = corpus.read_meta(out)
    assert meta["vocab_size"] == 600 and meta["bpe_vocab"] == 600
    assert meta["tokens"]["train"] < base_meta["tokens"]["train"]  # merges shorten the sequences
    tok = load_tokenizer(out)
    assert tok.is_trained
    with pytest.raises(UserError, match="must exceed the base vocabulary"):
        prep(tmp_path, "domain.source=files", f"domain.files={midi_folder}", "domain.bpe_vocab=10")


def test_nothing_usable_fails(tmp_path):
    (tmp_path / "bad").mkdir()
    for i in range(4):
        (tmp_path / "bad" / f"x{i}.mid").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no usable data left"):
        prep(tmp_path, "domain.source=files", f"domain.files={tmp_path / 'bad'}")
    with pytest.raises(UserError, match="matches no files"):
        prep(tmp_path, "domain.source=files", f"domain.files={tmp_path / 'none'}/*.mid")


def test_maestro_from_a_local_archive(tmp_path):
    import zipfile

    rows = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
    for i, split in enumerate(["train"] * 4 + ["validation", "test"]):
        write_piece(tmp_path / f"p{i}.mid", seed=i, tracks=1)
        rows.append(f"Chopin,Etude {i},{split},2018,2018/p{i}.midi,2018/p{i}.wav,10.0")
    with zipfile.ZipFile(tmp_path / "maestro.zip", "w") as z:
        z.writestr("maestro-v3.0.0/maestro-v3.0.0.csv", "\n".join(rows) + "\n")
        for i in range(6):
            z.write(tmp_path / f"p{i}.mid", f"maestro-v3.0.0/2018/p{i}.midi")
    out = prep(tmp_path, "domain=maestro", f"domain.path={tmp_path / 'maestro.zip'}")
    meta = corpus.read_meta(out)
    assert meta["pieces"] == {"train": 4, "val": 1, "test": 1} and out.name.startswith("maestro-")
    assert "Velocity" in " ".join(load_tokenizer(out).vocab)  # the piano defaults keep velocities


@pytest.mark.slow
def test_music21_chorales_train_and_eval(tmp_path):
    out = prep(tmp_path, "domain.max_pieces=5")
    meta = corpus.read_meta(out)
    assert sum(meta["pieces"].values()) == 5 and meta["source"] == "music21"
    index_file = tmp_path / "data/downloads/music21/bach/index-v2.json"
    assert 5 <= len(json.loads(index_file.read_text())) < 20  # only as many works as needed were converted
    stamp = index_file.stat().st_mtime_ns
    prep(tmp_path, "domain.max_pieces=5")
    assert index_file.stat().st_mtime_ns == stamp  # converted once, cached
    base = [f"data.root={tmp_path / 'data'}", "domain=music", "domain.max_pieces=5", *TINY]
    train(compose("train", base + ["model=shortcut", "train.max_steps=10"]), tmp_path / "run")
    result = evaluate(compose("eval", [f"run_dir={tmp_path / 'run'}"]))
    assert result["bits_per_note"] > result["bits_per_token"] > 0
