"""Audio: sounds the tests make (tones, chirps, noise, silence, stereo, odd rates, a corrupt file, a LibriSpeech-like
tree), resampling and down-mix, mu-law, the k-means codebook, split rules, skip-and-report, and a smoke training."""

import importlib.util

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import TINY
from shortcut import corpus
from shortcut.cli import compose
from shortcut.config import UserError
from shortcut.evaluate import evaluate
from shortcut.prepare import prepare
from shortcut.prepare import audio as audio_mod
from shortcut.prepare.audio import MuLaw, kmeans_fit, load_audio, load_tokenizer, split_files
from shortcut.train import train


def sound(kind: str, seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    if kind == "tone":
        return 0.5 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    if kind == "chirp":
        return 0.4 * np.sin(2 * np.pi * (100 + 800 * t / seconds) * t)
    if kind == "noise":
        return 0.3 * rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 3 * t) > 0)  # bursts
    return np.zeros(len(t))  # silence


def librispeech(root, layout):
    """A LibriSpeech folder: {subset: [speakers]}, 2 utterances per speaker and chapter, with transcripts."""
    for subset, speakers in layout.items():
        for spk in speakers:
            chapter = root / subset / str(spk) / "77"
            chapter.mkdir(parents=True)
            lines = []
            for utt in range(2):
                sf.write(chapter / f"{spk}-77-{utt:04d}.flac", sound("chirp", 0.4, 16000, utt), 16000)
                lines.append(f"{spk}-77-{utt:04d} A SHORT LINE {utt}")
            (chapter / f"{spk}-77.trans.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def audio_folder(tmp_path):
    """Speech-like files from 5 'speakers' (SPEAKER-CHAPTER-UTT names), mixed rates and channels, plus bad files."""
    folder = tmp_path / "audio"
    folder.mkdir()
    kinds = ["tone", "chirp", "noise", "tone", "silence"]
    for spk in range(5):
        for utt in range(3):
            rate = [8000, 16000, 22050, 44100][(spk + utt) % 4]
            x = np.concatenate([sound(kinds[(spk + utt) % 5], 0.6, rate, spk), sound("silence", 0.2, rate),
                                sound("chirp", 0.4, rate)])
            if utt == 1:
                x = np.stack([x, 0.5 * x], axis=1)  # stereo
            sf.write(folder / f"{100 + spk}-7-{utt:04d}.{'flac' if utt == 2 else 'wav'}", x, rate)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    sf.write(folder / "empty.wav", np.zeros(0), 16000)
    return folder


def prep(tmp_path, *overrides):
    return prepare(compose("prepare", [f"data.root={tmp_path / 'data'}", "domain=audio", *overrides]))


def test_resample_and_downmix(tmp_path):
    x = sound("tone", 1.0, 44100)
    sf.write(tmp_path / "s.wav", np.stack([x, -x * 0.2], axis=1), 44100)
    y = load_audio(tmp_path / "s.wav", 16000)
    assert y.ndim == 1 and abs(len(y) - 16000) <= 1
    assert np.abs(y).max() == pytest.approx(0.95, abs=1e-3)  # peak-normalised
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * 16000 / len(y) - 220) < 2  # the tone survives resampling


def test_mulaw_round_trip():
    x = np.linspace(-0.95, 0.95, 2001).astype(np.float32)
    tok = MuLaw(8000)
    ids = tok.encode(x)
    assert ids.min() >= 0 and ids.max() <= 255
    err = np.abs(tok.decode(ids) - x)
    assert err.max() < 0.03 and np.mean(err[np.abs(x) < 0.05]) < 0.002  # fine steps near zero


def test_kmeans_is_deterministic_and_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    a, b = kmeans_fit(x, 3, 20, seed=1), kmeans_fit(x, 3, 20, seed=1)
    assert torch.equal(a, b)
    found = sorted(a.round().tolist())
    assert found == sorted(centres.tolist())


@pytest.mark.parametrize("by_speaker", [False, True])
def test_split_rules(tmp_path, by_speaker):
    paths = [tmp_path / f"{s}-1-{u:04d}.wav" for s in range(10) for u in range(4)]
    splits = split_files(paths, 0.1, 0.1, by_speaker)
    assert sum(len(v) for v in splits.values()) == 40 and all(splits[s] for s in corpus.SPLITS)
    if by_speaker:
        speakers = {s: {p.name.split("-")[0] for p in v} for s, v in splits.items()}
        assert not speakers["train"] & speakers["val"] and not speakers["val"] & speakers["test"]
    assert split_files(list(reversed(paths)), 0.1, 0.1, by_speaker) == splits


def test_kmeans_corpus_codebook_from_train_only(tmp_path, audio_folder, monkeypatch):
    seen = []
    real = audio_mod._features
    monkeypatch.setattr(audio_mod, "_features", lambda path: (seen.append(path), real(path))[1])
    args = ["domain.source=files", f"domain.files={audio_folder}", "domain.codebook_size=16", "domain.by_speaker=true"]
    out = prep(tmp_path, *args, "prepare.workers=1")
    meta = corpus.read_meta(out)
    usable = sorted(p for p in audio_folder.iterdir() if p.name not in ("corrupt.wav", "empty.wav"))
    train = split_files(usable, 0.1, 0.1, by_speaker=True)["train"]
    assert sorted(seen) == sorted(map(str, train)) and len(seen) == meta["files"]["train"]  # train files only
    assert sorted(meta["skipped"]) == sorted(str(audio_folder / n) for n in ("corrupt.wav", "empty.wav"))
    assert meta["vocab_size"] == 16 and meta["sample_rate"] == 16000
    assert meta["tokens_per_second"]["train"] == pytest.approx(100, rel=0.02)  # 10 ms hop
    assert meta["units"]["second"]["test"] > 0 and set(meta["token_classes"]) <= {"silence", "speech"}
    # the codebook persists: re-tokenising a test file with the saved codebook gives the stored tokens
    tok = load_tokenizer(out, compose("prepare", ["domain=audio", "domain.codebook_size=16"]).domain)
    assert torch.equal(tok.codebook, torch.from_numpy(np.load(out / "codebook.npy")))
    # deterministic, and the same whatever the number of workers: byte-identical corpus and codebook
    monkeypatch.setattr(audio_mod, "_features", real)
    again = prepare(compose("prepare", [f"data.root={tmp_path / 'again'}", "domain=audio", *args, "prepare.workers=2"]))
    assert corpus.read_meta(again)["content_hash"] == meta["content_hash"]
    for name in ("train.bin", "val.bin", "test.bin", "codebook.npy"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.slow
def test_mulaw_corpus_and_smoke_training(tmp_path, audio_folder):
    out = prep(tmp_path, "domain.source=files", f"domain.files={audio_folder}", "domain.tokenizer=mulaw")
    meta = corpus.read_meta(out)
    assert meta["vocab_size"] == 256 and meta["sample_rate"] == 8000
    assert meta["tokens"]["train"] == pytest.approx(meta["seconds"]["train"] * 8000, abs=meta["files"]["train"])
    base = [f"data.root={tmp_path / 'data'}", "domain=audio", "domain.source=files", "domain.tokenizer=mulaw", *TINY]
    train(compose("train", base + ["model=shortcut", "train.max_steps=10"]), tmp_path / "run")
    result = evaluate(compose("eval", [f"run_dir={tmp_path / 'run'}", "eval.audit_sequences=2"]))
    assert result["nll_per_second"] == pytest.approx(result["test_nll"] * 8000, rel=0.01)
    assert (tmp_path / "run" / "audit" / "depth_profile.png").is_file()


def test_librispeech_layout(tmp_path):
    root = librispeech(tmp_path / "LibriSpeech", {"train-clean-100": [19, 26, 32], "dev-clean": [84],
                                                   "test-clean": [61]})
    out = prep(tmp_path, "domain.source=librispeech", f"domain.path={tmp_path}", "domain.codebook_size=8")
    meta = corpus.read_meta(out)
    assert meta["files"] == {"train": 6, "val": 2, "test": 2} and meta["n_transcripts"] == 10
    with pytest.raises(UserError, match="no other-clean.*it has dev-clean, test-clean, train-clean-100"):
        prep(tmp_path, "domain.source=librispeech", f"domain.path={root}", "domain.test_subsets=[other-clean]")


def test_offline_and_missing_pieces_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(audio_mod, "LIBRISPEECH_URL", "http://127.0.0.1:9/{subset}.tar.gz")
    with pytest.raises(UserError, match="domain.source=espeak"):
        prep(tmp_path, "domain.source=librispeech")
    with pytest.raises(UserError, match="domain.files"):
        prep(tmp_path, "domain.source=files")
    if importlib.util.find_spec("transformers"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        match = "not cached"
    else:
        match = "needs transformers"
    with pytest.raises(UserError, match=match):
        audio_mod.EncodecCodes(compose("prepare", ["domain=audio", "domain.tokenizer=encodec"]).domain)


def test_espeak_offline_speech(tmp_path):
    pytest.importorskip("espeakng_loader")
    out = prep(tmp_path, "domain.utterances=9", "domain.tokenizer=mulaw")
    meta = corpus.read_meta(out)
    assert meta["source"] == "espeak" and sum(meta["files"].values()) == 9
    assert 1.0 < meta["seconds"]["train"] / meta["files"]["train"] < 10  # real sentences, seconds long
    wavs = sorted((tmp_path / "data" / "downloads" / "espeak").glob("*/*.wav"))
    assert len({w.name.split("-")[0] for w in wavs}) > 1  # several voices
    first = sf.read(wavs[0])[0]
    assert np.abs(first).max() > 0.05  # not silence
