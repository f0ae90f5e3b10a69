"""Acoustic-token corpora: LibriSpeech, local audio files and offline eSpeak NG speech, as mu-law samples, k-means
codes of log-mel frames, or EnCodec codes.

Audio is read with soundfile, down-mixed to mono, resampled to the tokenizer's rate and peak-normalised. Splits are
by utterance (or speaker), never inside one. Each utterance is a run of tokens; utterances are concatenated.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shortcut import corpus
from shortcut.config import AudioDomain, AudioSource, AudioTokenizer, UserError
from shortcut.download import download, require_network
from shortcut.prepare.common import (check_inputs, find_files, inputs_of, read_and_split, report_skipped,
                                     split_whole)

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif")
LIBRISPEECH_URL = "https://www.openslr.org/resources/12/{subset}.tar.gz"
ENCODEC_MODEL = "facebook/encodec_24khz"

# Sentences for the offline speech corpus, written for this project: varied phonetics, numbers and punctuation.
SENTENCES = """The quiet river ran past the old mill before the sun came up.
Seven bright kites drifted over the harbour on a windy afternoon.
Please check the numbers twice: forty two, nineteen, and three hundred.
A careful reader notices when a long sentence changes direction halfway through.
Thin ice cracked under the weight of the heavy wooden sledge.
Would you bring the blue notebook and the small brass key tomorrow?
The orchestra tuned their instruments while the audience found their seats.
Measurements taken at dawn were colder than any recorded last winter.
She whispered the answer, and then laughed at how simple it was.
Fresh bread, strong coffee, and an open window make a good morning.
The train to the northern coast leaves at half past eight.
Every layer of the model passes its output to the next one.
Yellow leaves gathered in the corners of the empty courtyard.
How many stars can you count on a clear night far from the city?
The engineer measured the bridge, then measured it again to be sure.
Rain drummed on the tin roof for most of the night.
Music, speech and text are all sequences of symbols in time.
He packed a map, a compass, some matches and a loaf of bread.
The museum opens at ten and closes at five on weekdays.
Small mistakes in the first step often grow in the last.
Birds gathered on the telephone wires before the storm arrived.
Turn left at the church, then walk straight until you reach the square.
The recipe asks for two eggs, a cup of flour and a pinch of salt.
A distant bell rang twelve times across the sleeping valley.
They argued politely about whether the painting was finished.
Clouds of steam rose from the kettle as the water began to boil.
Learning a new language takes patience, practice and curiosity.
The lighthouse keeper wrote in his log every evening at nine.
Thousands of people crossed the bridge during the festival.
Why does the moon look larger when it is close to the horizon?""".splitlines()


# --- reading audio ---

def load_audio(path: Path, rate: int) -> np.ndarray:
    """Mono float32 at `rate`, peak-normalised; raises on unreadable or empty files."""
    import soundfile as sf
    import torchaudio.functional as AF

    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    if wav.shape[0] == 0:
        raise ValueError("no samples")
    mono = torch.from_numpy(wav.mean(axis=1))
    if sr != rate:
        mono = AF.resample(mono, sr, rate)
    peak = float(mono.abs().max())
    return (mono / peak * 0.95 if peak > 0 else mono).numpy()


# --- tokenizers ---

class MuLaw:
    """8-bit mu-law of the waveform: one token per sample (torchaudio.functional.mu_law_encoding)."""

    vocab_size = 256

    def __init__(self, rate: int):
        self.rate = rate

    def encode(self, wav: np.ndarray) -> np.ndarray:
        import torchaudio.functional as AF

        return AF.mu_law_encoding(torch.from_numpy(wav).clamp(-1, 1), 256).numpy().astype(np.int64)

    def decode(self, ids) -> np.ndarray:
        import torchaudio.functional as AF

        return AF.mu_law_decoding(torch.as_tensor(np.asarray(ids)), 256).numpy()

    def token_classes(self) -> list[str]:
        # Codes near the middle are near-zero amplitude: call them silence.
        return ["silence" if abs(i - 127.5) < 8 else "speech" for i in range(256)]


class LogMel:
    """Log-mel frames (torchaudio MelSpectrogram), win_ms window and hop_ms hop."""

    def __init__(self, cfg: AudioDomain):
        import torchaudio

        self.rate = cfg.rate
        self.hop = int(round(cfg.rate * cfg.hop_ms / 1000))
        win = int(round(cfg.rate * cfg.win_ms / 1000))
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=cfg.rate, n_fft=max(win, 2 ** int(np.ceil(np.log2(win)))),
                                                        win_length=win, hop_length=self.hop, n_mels=cfg.n_mels)

    @torch.no_grad()
    def __call__(self, wav: np.ndarray) -> torch.Tensor:
        return (self.mel(torch.from_numpy(wav)) + 1e-6).log().T.contiguous()  # (frames, n_mels)


def kmeans_fit(x: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """k-means with k-means++ initialisation (Arthur & Vassilvitskii 2007), in torch. x: (N, D) -> (k, D).

    Distances in float32 (the costly part), centroid sums in float64."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    k = min(k, len(x))
    centres = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        c = x[torch.multinomial(probs, 1, generator=g)].squeeze(0)
        centres.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    c = torch.stack(centres)
    x64 = x.double()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros(c.shape, dtype=torch.float64).index_add_(0, assign, x64)
        counts = torch.bincount(assign, minlength=len(c)).unsqueeze(1)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), c.double()).float()  # empty: keep the centre
        if torch.equal(moved, c):
            break
        c = moved
    return c


class KMeansCodes:
    """Log-mel frames -> nearest codebook entry. The codebook is fitted on training frames only."""

    def __init__(self, cfg: AudioDomain, codebook: torch.Tensor | None = None):
        self.cfg = cfg
        self.features = LogMel(cfg)
        self.codebook = codebook
        self.rate = cfg.rate

    @property
    def vocab_size(self) -> int:
        return len(self.codebook)

    def fit(self, wavs: list[np.ndarray]) -> None:
        frames = torch.cat([self.features(w) for w in tqdm(wavs, desc="log-mel (fit)", disable=len(wavs) < 50)])
        g = torch.Generator().manual_seed(self.cfg.seed)
        if len(frames) > self.cfg.kmeans_max_frames:
            frames = frames[torch.randperm(len(frames), generator=g)[: self.cfg.kmeans_max_frames]]
        self.codebook = kmeans_fit(frames, self.cfg.codebook_size, self.cfg.kmeans_iters, self.cfg.seed)

    def encode(self, wav: np.ndarray) -> np.ndarray:
        codes = torch.cdist(self.features(wav), self.codebook).argmin(1).numpy().astype(np.int64)
        if self.cfg.collapse_repeats and len(codes):
            codes = codes[np.r_[True, codes[1:] != codes[:-1]]]
        return codes

    def token_classes(self) -> list[str]:
        # Centroids with the lowest mean log-mel energy are (near) silence; the quietest tenth of the codebook.
        energy = self.codebook.mean(1)
        cut = torch.quantile(energy, 0.1)
        return ["silence" if e <= cut else "speech" for e in energy.tolist()]


class EncodecCodes:
    """EnCodec 24 kHz codes (Défossez et al. 2022) through transformers, flattened frame by frame."""

    def __init__(self, cfg: AudioDomain):
        try:
            from transformers import EncodecModel
        except ImportError:
            raise UserError("domain.tokenizer=encodec needs transformers: pip install 'shortcut[encodec]'") from None
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            try:
                self.model = EncodecModel.from_pretrained(ENCODEC_MODEL).eval()
            except OSError:
                raise UserError(f"the EnCodec weights ({ENCODEC_MODEL}) are not cached and HF_HUB_OFFLINE=1; use "
                                f"domain.tokenizer=kmeans or mulaw offline") from None
        else:
            require_network("https://huggingface.co", f"the EnCodec weights ({ENCODEC_MODEL})",
                            "Use domain.tokenizer=kmeans or domain.tokenizer=mulaw offline.")
            self.model = EncodecModel.from_pretrained(ENCODEC_MODEL).eval()
        self.rate, self.k = 24000, cfg.encodec_codebooks
        self.bandwidth = {2: 1.5, 4: 3.0, 8: 6.0, 16: 12.0, 32: 24.0}[self.k]
        self.vocab_size = self.model.config.codebook_size * self.k  # codebook j uses ids j*1024 ...

    @torch.no_grad()
    def encode(self, wav: np.ndarray) -> np.ndarray:
        out = self.model.encode(torch.from_numpy(wav)[None, None], bandwidth=self.bandwidth)
        codes = out.audio_codes[0, 0]  # (k, frames)
        offsets = torch.arange(codes.shape[0])[:, None] * self.model.config.codebook_size
        return (codes + offsets).T.reshape(-1).numpy().astype(np.int64)  # frame by frame

    def token_classes(self) -> list[str]:
        return [f"codebook{i // self.model.config.codebook_size}" for i in range(self.vocab_size)]


# --- sources: each gives {split: [audio paths]} or a flat list to split by file/speaker ---

def speaker_of(path: Path) -> str:
    m = re.match(r"^(\d+)-\d+-\d+", path.stem)
    return m.group(1) if m else path.parent.name


def split_files(paths: list[Path], val_frac: float, test_frac: float, by_speaker: bool) -> dict[str, list[Path]]:
    """By file, or by speaker so that no voice is heard in two splits."""
    if by_speaker:
        return split_whole(paths, val_frac, test_frac, key=speaker_of, unit="speaker")
    return split_whole(paths, val_frac, test_frac, unit="file")


def _files_source(cfg: AudioDomain, root: Path):
    paths = find_files(cfg.files, "speech/**/*.wav", AUDIO_SUFFIXES)
    return paths[: cfg.max_files] if cfg.max_files else paths


def librispeech_subset(folder: Path, subset: str) -> list[Path]:
    """Utterance files of one subset in LibriSpeech's own layout: SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac."""
    base = folder / subset
    if not base.is_dir():
        have = sorted(p.name for p in folder.iterdir() if p.is_dir() and list(p.glob("*/*/*.flac"))[:1])
        raise UserError(f"{folder} has no {subset}/ subset folder (LibriSpeech layout: LibriSpeech/{subset}/SPEAKER/"
                        f"CHAPTER/SPEAKER-CHAPTER-UTT.flac); it has {', '.join(have) or 'no subsets'}: choose with "
                        f"domain.train_subset=, domain.val_subset=, domain.test_subset=, or use domain.source=files "
                        f"domain.by_speaker=true to split what you have")
    paths = sorted(base.glob("*/*/*.flac"))
    if not paths:
        raise UserError(f"{base} holds no SPEAKER/CHAPTER/*.flac utterances")
    return paths


def read_transcripts(paths: list[Path]) -> dict[str, str]:
    """Utterance id -> transcript, from the *.trans.txt files beside the utterances."""
    out = {}
    for trans in sorted({p.parent for p in paths}):
        for f in trans.glob("*.trans.txt"):
            for line in f.read_text().splitlines():
                if " " in line:
                    utt, text = line.split(" ", 1)
                    out[utt] = text
    return out


def _librispeech_source(cfg: AudioDomain, root: Path):
    subsets = {"train": cfg.train_subset, "val": cfg.val_subset, "test": cfg.test_subset}
    if cfg.path:
        folder = Path(os.path.expanduser(cfg.path))
        if (folder / "LibriSpeech").is_dir():
            folder = folder / "LibriSpeech"
        if not folder.is_dir():
            raise UserError(f"domain.path={cfg.path!r} is not a folder (expected an extracted LibriSpeech/)")
    else:
        folder = root / "downloads" / "LibriSpeech"
        alternative = ("Give a local extracted copy with domain.path=/path/to/LibriSpeech, or use "
                       "domain.source=espeak (offline) or domain.source=files domain.files='speech/*.flac'.")
        for subset in subsets.values():
            if not (folder / subset).is_dir():
                archive = download(LIBRISPEECH_URL.format(subset=subset), root / "downloads" / f"{subset}.tar.gz",
                                   f"LibriSpeech {subset}", alternative)
                tmp = root / "downloads" / f".extract-{subset}"
                shutil.rmtree(tmp, ignore_errors=True)
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, filter="data")
                folder.mkdir(parents=True, exist_ok=True)
                (tmp / "LibriSpeech" / subset).rename(folder / subset)
                shutil.rmtree(tmp, ignore_errors=True)
    splits = {s: librispeech_subset(folder, sub) for s, sub in subsets.items()}
    if cfg.max_files:
        splits = {s: p[: max(1, cfg.max_files // 3)] for s, p in splits.items()}
    return splits


class Espeak:
    """eSpeak NG through its C library (the espeakng-loader wheel ships it with its voices)."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            espeakng_loader = None
        self.lib = None
        if espeakng_loader is not None:
            self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data = espeakng_loader.get_data_path().encode()
            self.rate = self.lib.espeak_Initialize(2, 0, data, 0)  # 2: AUDIO_OUTPUT_SYNCHRONOUS
            self._chunks: list[np.ndarray] = []
            proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
            self._callback = proto(self._collect)  # kept alive as long as self
            self.lib.espeak_SetSynthCallback(self._callback)
        elif shutil.which("espeak-ng"):
            self.rate = 22050
        else:
            raise UserError("domain.source=espeak needs eSpeak NG: pip install espeakng-loader (a dependency of "
                            "shortcut) or install the espeak-ng program")

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(self, text: str, voice: str, rate: int) -> np.ndarray:
        """int16 samples at self.rate."""
        if self.lib is None:
            import subprocess
            import tempfile

            import soundfile as sf

            with tempfile.NamedTemporaryFile(suffix=".wav") as f:
                subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", f.name, text], check=True,
                               capture_output=True)
                return sf.read(f.name, dtype="int16")[0]
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UserError(f"eSpeak NG has no voice {voice!r} (domain.voices); try en-us, en-gb-x-rp, en+f3")
        self.lib.espeak_SetParameter(1, rate, 0)  # 1: espeakRATE
        self._chunks = []
        data = text.encode("utf-8")
        self.lib.espeak_Synth(ctypes.c_char_p(data), len(data) + 1, 0, 1, 0, 1, None, None)  # 1: UTF-8
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _espeak_source(cfg: AudioDomain, root: Path):
    """Synthesise domain.utterances sentences into WAV files once (cached by settings), deterministic in seed."""
    import soundfile as sf

    if cfg.text:
        from shortcut.prepare.text import read_utf8

        text = " ".join(read_utf8(p) for p in find_files(cfg.text, "books/*.txt"))
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip().split()) >= 3]
        if not sentences:
            raise UserError(f"domain.text={cfg.text!r} holds no sentences to speak")
    else:
        sentences = SENTENCES
    settings = json.dumps([sentences[:50], len(sentences), cfg.voices, cfg.rates, cfg.utterances, cfg.seed])
    key = hashlib.sha1(settings.encode()).hexdigest()[:12]
    cache = root / "downloads" / "espeak" / key
    if not (cache / ".complete").is_file():
        engine = Espeak()
        rng = np.random.default_rng(cfg.seed)
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in tqdm(range(cfg.utterances), desc="espeak speech", disable=cfg.utterances < 50):
            voice = cfg.voices[int(rng.integers(len(cfg.voices)))]
            rate = cfg.rates[int(rng.integers(len(cfg.rates)))]
            sentence = sentences[int(rng.integers(len(sentences)))] if cfg.text else sentences[i % len(sentences)]
            wav = engine.say(sentence, voice, rate)
            speaker = re.sub(r"[^A-Za-z0-9]", "", voice)
            sf.write(str(tmp / f"{speaker}-{rate}-{i:05d}.wav"), wav, engine.rate, subtype="PCM_16")
        (tmp / ".complete").write_text(settings)
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)
    return sorted(cache.glob("*.wav"))


SOURCES = {AudioSource.files: _files_source, AudioSource.librispeech: _librispeech_source,
           AudioSource.espeak: _espeak_source}


def make_tokenizer(cfg: AudioDomain):
    if cfg.tokenizer == AudioTokenizer.mulaw:
        return MuLaw(cfg.rate)
    if cfg.tokenizer == AudioTokenizer.kmeans:
        return KMeansCodes(cfg)
    return EncodecCodes(cfg)


def load_tokenizer(corpus_path: Path, cfg: AudioDomain):
    """The tokenizer a corpus was made with (the k-means codebook is read from codebook.npy)."""
    tok = make_tokenizer(cfg)
    if isinstance(tok, KMeansCodes):
        tok.codebook = torch.from_numpy(np.load(Path(corpus_path) / "codebook.npy"))
    return tok


def prepare_audio(cfg: AudioDomain, root: Path) -> Path:
    out = corpus.corpus_dir(root, cfg)
    found = SOURCES[cfg.source](cfg, root)
    input_hash, done = check_inputs(out, inputs_of(found), json.dumps(corpus.settings_of(cfg), sort_keys=True))
    if done:
        return out
    tok = make_tokenizer(cfg)
    skipped: dict[str, str] = {}
    splits, wavs = read_and_split(found, lambda p: load_audio(p, tok.rate), skipped,
                                  lambda paths: split_files(paths, cfg.val_frac, cfg.test_frac, cfg.by_speaker), "audio")
    if isinstance(tok, KMeansCodes):
        tok.fit([wavs[p] for p in splits["train"]])  # the training split only
    tokens, seconds, files, rtf = {}, {}, {}, {}
    for split in corpus.SPLITS:
        t0 = time.perf_counter()
        ids = [tok.encode(wavs[p]) for p in tqdm(splits[split], desc=f"tokenize {split}", disable=len(splits[split]) < 20)]
        elapsed = time.perf_counter() - t0
        tokens[split] = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        seconds[split] = float(sum(len(wavs[p]) for p in splits[split]) / tok.rate)
        files[split] = len(splits[split])
        rtf[split] = seconds[split] / elapsed if elapsed > 0 else None  # x faster than real time
    extra = {}
    if isinstance(tok, KMeansCodes):
        buf = io.BytesIO()
        np.save(buf, tok.codebook.numpy())
        extra["codebook.npy"] = buf.getvalue()
    transcripts = read_transcripts(inputs_of(found)) if cfg.source != AudioSource.espeak else {}
    meta = {
        "domain": cfg.name, "source": str(cfg.source), "tokenizer": str(cfg.tokenizer), "vocab_size": tok.vocab_size,
        "sample_rate": tok.rate, "files": files, "seconds": seconds, "hours": {s: v / 3600 for s, v in seconds.items()},
        "units": {"second": seconds},
        "tokens_per_second": {s: len(tokens[s]) / seconds[s] for s in corpus.SPLITS},
        "seconds_per_token": seconds["val"] / max(1, len(tokens["val"])),
        "token_classes": tok.token_classes(), "realtime_factor": rtf, "skipped": skipped,
        "n_skipped": len(skipped), "n_transcripts": len(transcripts), "settings": corpus.settings_of(cfg),
        "input_hash": input_hash,
    }
    meta = corpus.write_corpus(out, tokens, meta, extra_files=extra)
    log.info("wrote %s: %s tokens at %d Hz, vocab %d; files %s, hours %s, tokens %s; tokenizing ran %s x real time",
             out, cfg.tokenizer, tok.rate, tok.vocab_size, "/".join(str(files[s]) for s in corpus.SPLITS),
             "/".join(f"{seconds[s] / 3600:.3f}" for s in corpus.SPLITS),
             "/".join(f"{meta['tokens'][s]:,}" for s in corpus.SPLITS),
             "/".join(f"{v:.0f}" if v else "-" for v in rtf.values()))
    report_skipped(skipped)
    return out
