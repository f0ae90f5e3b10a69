"""Acoustic-token corpora: LibriSpeech, local audio files and offline eSpeak NG speech, as mu-law samples, k-means
codes of log-mel frames, or EnCodec codes.

Audio is read with soundfile, down-mixed to mono, resampled to the tokenizer's rate and peak-normalised. Splits are
by utterance (or speaker), never inside one. Each utterance is a run of tokens; utterances are concatenated.
Streaming (issue 14): file headers are checked first (the split is made among readable files); the k-means codebook
is fitted on a uniform sample of `domain.kmeans_frames` training frames drawn from a seeded selection of training
files, so the fit costs the same for 2 hours or 960; then every file is decoded and tokenized by parallel workers,
one at a time each, and the tokens are appended in order. Memory holds a few utterances, never the corpus.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shortcut import corpus, diskio
from shortcut.config import AudioDomain, AudioSource, AudioTokenizer, PrepareConfig, UserError
from shortcut.download import download, require_network
from shortcut.prepare.common import (Committer, Problems, RunTokenizer, already_done, find_files, inputs_of, kept, ordered_map,
                                     split_whole, survey, worker_count)

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif")
LIBRISPEECH_URL = "https://www.openslr.org/resources/12/{subset}.tar.gz"
# sha256 of the official archives as torchaudio.datasets.librispeech records them (it checks downloads with them).
LIBRISPEECH_SHA256 = {
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}
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


_KM: dict = {}  # in a k-means worker: the sample being clustered


def _km_init(x: torch.Tensor) -> None:
    torch.set_num_threads(1)
    _KM["x"] = x


def _km_chunk(job: tuple[np.ndarray, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd step's share: float64 sums and counts of the rows [lo, hi) nearest to each centre. Arrays cross
    processes as numpy: torch would move every tensor sent through a pipe into shared memory, and keep it."""
    c, lo, hi = job
    c = torch.from_numpy(c)
    part = _KM["x"][lo:hi]
    assign = torch.addmm((c * c).sum(1), part, (-2 * c).T).argmin(1)  # the nearest centre (|x|^2 is the same for all)
    sums = torch.zeros(c.shape, dtype=torch.float64).index_add_(0, assign, part.double())
    return sums.numpy(), torch.bincount(assign, minlength=len(c)).numpy()


def kmeans_fit(x: torch.Tensor, k: int, iters: int, seed: int = 0, chunk: int = 1 << 14,
               workers: int = 1) -> torch.Tensor:
    """k-means with k-means++ initialisation (Arthur & Vassilvitskii 2007), in torch. x: (N, D) -> (k, D).

    Distances in float32 (the costly part), in chunks of rows so the (N, k) distance matrix is never whole; centroid
    sums in float64, added chunk by chunk in order. The Lloyd steps' chunks are spread over `workers` processes; the
    chunks and their order do not depend on that number, so neither does the result."""
    g = torch.Generator().manual_seed(seed)
    x = x.float().contiguous()
    k = min(k, len(x))
    xx = (x * x).sum(1)

    def dist2(c: torch.Tensor) -> torch.Tensor:  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one pass over x, no (N, D) temp
        return (xx - 2 * (x @ c) + c @ c).clamp_min_(0)

    centres = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    d2 = dist2(centres[0])
    for _ in range(1, k):  # the next centre with probability proportional to d2 (inverse CDF: one cumsum)
        cum = torch.cumsum(d2.double(), 0)
        if cum[-1] > 0:
            pick = torch.searchsorted(cum, torch.rand(1, generator=g, dtype=torch.float64) * cum[-1])
        else:
            pick = torch.randint(len(x), (1,), generator=g)
        c = x[pick.clamp_max(len(x) - 1)].squeeze(0)
        centres.append(c)
        d2 = torch.minimum(d2, dist2(c))
    c = torch.stack(centres)
    bounds = [(lo, min(lo + chunk, len(x))) for lo in range(0, len(x), chunk)]
    workers = max(1, min(workers, len(bounds)))
    if workers > 1:
        from shortcut.prepare.common import process_pool

        pool = process_pool(workers, _km_init, (x,))
        step = pool.map
    else:
        _KM["x"], pool, step = x, None, map
    try:
        for _ in range(iters):
            sums = torch.zeros(c.shape, dtype=torch.float64)
            counts = torch.zeros(len(c), dtype=torch.int64)
            for part_sums, part_counts in step(_km_chunk, [(c.numpy(), lo, hi) for lo, hi in bounds]):
                sums += torch.from_numpy(part_sums)
                counts += torch.from_numpy(part_counts)
            counts = counts.unsqueeze(1)
            moved = torch.where(counts > 0, sums / counts.clamp_min(1), c.double()).float()  # empty: keep the centre
            if torch.equal(moved, c):
                break
            c = moved
    finally:
        _KM.clear()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return c


class FrameSample:
    """A uniform sample without replacement of at most k frames from a stream of utterances: every frame gets a
    random key from (seed, utterance name, frame index) and the k smallest keys are kept (bottom-k sampling). The
    sample depends on the frames and the seed only, not on how the stream was cut or how many workers made it."""

    def __init__(self, k: int, seed: int):
        self.k, self.seed = k, seed
        self.keys, self.frames = np.zeros(0), None
        self._keys: list[np.ndarray] = []
        self._frames: list[np.ndarray] = []
        self._rows = 0
        self.seen = 0

    def add(self, name: str, frames: np.ndarray) -> None:
        entropy = int(hashlib.sha1(name.encode()).hexdigest()[:15], 16)
        keys = np.random.default_rng([self.seed, entropy]).random(len(frames))
        self.seen += len(frames)
        if len(self.keys) == self.k:  # full: a frame whose key is above the largest kept one can never get in
            keep = keys < self.keys.max()
            keys, frames = keys[keep], frames[keep]
        self._keys.append(keys)
        self._frames.append(np.asarray(frames, dtype=np.float32))
        self._rows += len(keys)
        if self._rows >= max(1, self.k // 4):
            self._merge()

    def _merge(self) -> None:
        if not self._keys:
            return
        keys = np.concatenate([self.keys, *self._keys])
        frames = np.concatenate(([self.frames] if self.frames is not None else []) + self._frames)
        if len(keys) > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k]
            keys, frames = keys[keep], frames[keep]
        self.keys, self.frames = keys, frames
        self._keys, self._frames, self._rows = [], [], 0

    def result(self) -> torch.Tensor:
        self._merge()
        if self.frames is None:
            return torch.zeros(0)
        order = np.argsort(self.keys, kind="stable")
        return torch.from_numpy(self.frames[order])


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

    def fit_sample(self, frames: torch.Tensor) -> None:
        self.codebook = kmeans_fit(frames, self.cfg.codebook_size, self.cfg.kmeans_iters, self.cfg.seed)

    def fit(self, wavs: list[np.ndarray]) -> None:
        """Fit on waveforms in memory (small inputs, benchmarks); prepare streams the frames instead."""
        sample = FrameSample(self.cfg.kmeans_frames, self.cfg.seed)
        for i, w in enumerate(wavs):
            sample.add(str(i), self.features(w).numpy())
        self.fit_sample(sample.result())

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


def _files_source(cfg: AudioDomain, root: Path, problems: Problems):
    paths = find_files(cfg.files, "speech/**/*.wav", AUDIO_SUFFIXES)
    return (paths[: cfg.max_files] if cfg.max_files else paths), None


def librispeech_subset(folder: Path, subset: str) -> tuple[list[Path], list[Path], list[Path], set[str]]:
    """One subset in LibriSpeech's own layout, SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac beside
    SPEAKER-CHAPTER.trans.txt: (its utterance files, the utterances its transcripts list whose audio is not there,
    the utterance files no transcript lists, the ids the transcripts list)."""
    base = folder / subset
    if not base.is_dir():
        have = sorted(p.name for p in folder.iterdir() if p.is_dir() and next(p.glob("*/*/*.flac"), None))
        raise UserError(f"{folder} has no {subset}/ subset folder (LibriSpeech layout: LibriSpeech/{subset}/SPEAKER/"
                        f"CHAPTER/SPEAKER-CHAPTER-UTT.flac); it has {', '.join(have) or 'no subsets'}: choose with "
                        f"domain.train_subsets=[...], domain.val_subsets=[...], domain.test_subsets=[...], or use "
                        f"domain.source=files domain.by_speaker=true to split what you have")
    flacs = sorted(base.glob("*/*/*.flac"))
    present = {p.stem for p in flacs}
    listed: set[str] = set()
    no_audio = []
    for trans in sorted(base.glob("*/*/*.trans.txt")):
        for line in trans.read_text(encoding="utf-8", errors="replace").splitlines():
            utt = line.split(" ", 1)[0].strip()
            if utt:
                listed.add(utt)
                if utt not in present:
                    no_audio.append(trans.parent / f"{utt}.flac")
    if not flacs:
        raise UserError(f"{base} holds no SPEAKER/CHAPTER/*.flac utterances"
                        f"{f' ({len(no_audio)} listed in its transcripts are missing)' if no_audio else ''}; "
                        f"is its extraction complete?")
    return flacs, no_audio, [p for p in flacs if p.stem not in listed], listed


def _extract_librispeech(root: Path, folder: Path, subset: str, alternative: str) -> None:
    sha = LIBRISPEECH_SHA256.get(subset)
    archive = download(LIBRISPEECH_URL.format(subset=subset), root / "downloads" / f"{subset}.tar.gz",
                       f"LibriSpeech {subset}", alternative, known_hash=f"sha256:{sha}" if sha else None)
    tmp = root / "downloads" / f".extract-{subset}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if diskio.is_disk_error(exc):  # the archive is fine: the disk is full
            raise diskio.DiskError(diskio.describe(tmp, f"the extracted LibriSpeech {subset}", exc)) from None
        raise UserError(f"{archive} could not be extracted ({type(exc).__name__}: {exc}); delete it and run again "
                        f"to download it anew. {alternative}") from None
    if not (tmp / "LibriSpeech" / subset).is_dir():
        raise UserError(f"{archive} holds no LibriSpeech/{subset}/ folder; is it the right archive?")
    folder.mkdir(parents=True, exist_ok=True)
    (tmp / "LibriSpeech" / subset).rename(folder / subset)
    shutil.rmtree(tmp, ignore_errors=True)


def _librispeech_source(cfg: AudioDomain, root: Path, problems: Problems):
    subsets = {"train": cfg.train_subsets, "val": cfg.val_subsets, "test": cfg.test_subsets}
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
        for subset in (name for names in subsets.values() for name in names):
            if not (folder / subset).is_dir():
                _extract_librispeech(root, folder, subset, alternative)
    splits, listed = {}, set()
    for split, names in subsets.items():
        splits[split] = []
        for name in names:
            flacs, no_audio, untranscribed, ids = librispeech_subset(folder, name)
            problems.absent(split, no_audio, "audio")
            problems.absent(split, [f"transcript of {p}" for p in untranscribed], "transcript")
            splits[split] += flacs
            listed |= ids
    if cfg.max_files:
        splits = {s: p[: max(1, cfg.max_files // 3)] for s, p in splits.items()}
    return splits, sum(p.stem in listed for s in corpus.SPLITS for p in splits[s])


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


def _espeak_source(cfg: AudioDomain, root: Path, problems: Problems):
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
        with diskio.guard(cache, "the spoken utterances", cleanup=(tmp,)):
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
    return sorted(cache.glob("*.wav")), None


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


# --- the work, in worker processes ---

POOL = 4  # the codebook's sample is drawn from the frames of about POOL * kmeans_frames frames of training audio
_WORKER: dict = {}


def _probe(path: str) -> float | str:
    """Seconds of audio the file's header announces, or why it cannot be used."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is skipped and named
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    if info.frames <= 0 or info.samplerate <= 0:
        return "no samples"
    return info.frames / info.samplerate


def _init_worker(cfg: AudioDomain, codebook: np.ndarray | None, threads: int) -> None:
    # One torch thread per worker: the workers are the parallelism, and one thread gives the same numbers whatever
    # their number (a matrix product's sums can be ordered differently with more threads).
    torch.set_num_threads(threads)
    tok = make_tokenizer(cfg)
    if codebook is not None:
        tok.codebook = torch.from_numpy(codebook)
    _WORKER["tok"] = tok


def _features(path: str) -> np.ndarray | str:
    try:
        return _WORKER["tok"].features(load_audio(Path(path), _WORKER["tok"].rate)).numpy()
    except Exception as exc:  # noqa: BLE001 - named when the tokenizing pass skips it
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def _tokenize(path: str) -> tuple[np.ndarray, float] | str:
    tok = _WORKER["tok"]
    try:
        wav = load_audio(Path(path), tok.rate)
        return tok.encode(wav).astype(corpus.token_dtype(tok.vocab_size)), len(wav) / tok.rate
    except Exception as exc:  # noqa: BLE001 - unreadable audio is skipped and named
        return f"{type(exc).__name__}: {str(exc)[:120]}"


# --- the stages: plan (headers, split), fit (codebook), tokenize ---

def _plan(found, cfg: AudioDomain, opts: PrepareConfig, problems: Problems) -> dict:
    inputs = inputs_of(found)
    seconds: dict[Path, float] = {}
    probes = ordered_map(_probe, [str(p) for p in inputs], worker_count(opts, len(inputs) // 500 + 1))
    for path, res in zip(inputs, probes):
        if isinstance(res, str):
            problems.skip(path, res)
        else:
            seconds[path] = res
    if isinstance(found, list):
        splits = split_files([p for p in found if p in seconds], cfg.val_frac, cfg.test_frac, cfg.by_speaker)
    else:
        splits = {s: [p for p in found[s] if p in seconds] for s in corpus.SPLITS}
    _check_splits({s: len(v) for s, v in splits.items()}, problems)
    return {"splits": {s: [str(p) for p in v] for s, v in splits.items()},
            "train_seconds": [seconds[p] for p in splits["train"]], "problems": problems.state()}


def _check_splits(counts: dict[str, int], problems: Problems) -> None:
    empty = [s for s in corpus.SPLITS if not counts[s]]
    if empty:
        raise UserError(f"no usable audio left for the {'/'.join(empty)} split(s) ({problems.n_skipped} file(s) "
                        f"skipped: {', '.join(list(problems.skipped)[:5])})")


def _fit_codebook(plan: dict, cfg: AudioDomain, opts: PrepareConfig) -> np.ndarray:
    """k-means on a uniform sample of kmeans_frames training frames, drawn from training files taken in a seeded
    order until they hold POOL times that many frames: the fit's time and memory do not grow with the corpus."""
    train, seconds = plan["splits"]["train"], plan["train_seconds"]
    order = sorted(range(len(train)), key=lambda i: hashlib.sha1(f"{cfg.seed}:{Path(train[i]).name}".encode())
                   .hexdigest())
    chosen, frames = [], 0.0
    for i in order:
        chosen.append(train[i])
        frames += seconds[i] * 1000 / cfg.hop_ms
        if frames >= POOL * cfg.kmeans_frames:
            break
    t0 = time.perf_counter()
    sample = FrameSample(cfg.kmeans_frames, cfg.seed)
    workers = worker_count(opts, len(chosen), per_worker_mb=WORKER_MB)
    feats = ordered_map(_features, chosen, workers, _init_worker, (cfg, None, 1))
    for path, res in zip(chosen, tqdm(feats, total=len(chosen), desc="log-mel (codebook sample)",
                                      disable=len(chosen) < 50)):
        if not isinstance(res, str):  # an unreadable file is named by the tokenizing pass
            sample.add(Path(path).name, res)
    frames = sample.result()
    if len(frames) < 2:
        raise UserError("the training audio holds fewer than 2 log-mel frames; give longer or more files")
    t1 = time.perf_counter()
    # One thread per process: the same codebook on any machine and for any number of workers (a product's sums are
    # not ordered the same with more threads), and no slow-down when other processes hold the cores (the
    # k-means++ loop ran 10x slower with 2 threads on 2 busy cores).
    torch.set_num_threads(1)
    codebook = kmeans_fit(frames, cfg.codebook_size, cfg.kmeans_iters, cfg.seed, workers=workers)
    log.info("codebook: %d codes fitted on %d frames sampled from %d of %d training files (%.0f s of audio) in "
             "%.1f s + %.1f s", len(codebook), len(frames), len(chosen), len(train), sample.seen * cfg.hop_ms / 1000,
             t1 - t0, time.perf_counter() - t1)
    return codebook.numpy()


WORKER_MB = 400  # a worker's footprint: the interpreter with torch, torchaudio and one decoded utterance


def prepare_audio(cfg: AudioDomain, root: Path, opts: PrepareConfig | None = None, given: RunTokenizer | None = None,
                  out: Path | None = None) -> Path:
    """The corpus of cfg under root (or at out). given: quantise with a trained run's k-means codebook instead of
    fitting one (eval.shift); mu-law and EnCodec codes do not depend on the data."""
    opts = opts or PrepareConfig()
    threads = torch.get_num_threads()
    try:
        return _prepare_audio(cfg, root, opts, given, out)
    finally:
        torch.set_num_threads(threads)  # a one-worker prepare runs in this process with one thread


def _prepare_audio(cfg: AudioDomain, root: Path, opts: PrepareConfig, given: RunTokenizer | None = None,
                   out: Path | None = None) -> Path:
    out = out or corpus.corpus_dir(root, cfg)
    problems = Problems(cfg.on_error, "audio")
    found, n_transcripts = SOURCES[cfg.source](cfg, root, problems)
    found, input_hash = survey(found, json.dumps(corpus.settings_of(cfg), sort_keys=True) + (given.key if given else ""),
                               problems)
    if already_done(out, input_hash, problems):
        return out
    with corpus.CorpusWriter(out, input_hash) as w:
        plan = kept(w, "plan.json", lambda: _plan(found, cfg, opts, problems))
        codebook = None
        if cfg.tokenizer == AudioTokenizer.kmeans and given is not None:
            codebook = np.asarray(given.codebook)
        elif cfg.tokenizer == AudioTokenizer.kmeans:
            codebook = kept(w, "codebook.npy", lambda: _fit_codebook(plan, cfg, opts), _npy, _from_npy)
        tok, done = _tokenize_files(w, plan, cfg, opts, codebook)
        _check_splits(done.files, done.problems)
        meta = w.finish({**_meta(cfg, tok, w, done, n_transcripts, input_hash),
                         **({"run_tokenizer": given.key} if given is not None else {})},
                        extra_files={} if codebook is None else {"codebook.npy": _npy(codebook)})
    log.info("wrote %s: %s tokens at %d Hz, vocab %d; files %s, hours %s, tokens %s; tokenizing ran %s x real time",
             out, cfg.tokenizer, tok.rate, tok.vocab_size, "/".join(str(done.files[s]) for s in corpus.SPLITS),
             "/".join(f"{done.seconds[s] / 3600:.3f}" for s in corpus.SPLITS),
             "/".join(f"{meta['tokens'][s]:,}" for s in corpus.SPLITS),
             "/".join(f"{done.rtf[s]:.0f}" if done.rtf.get(s) else "-" for s in corpus.SPLITS))
    done.problems.report()
    return out


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _from_npy(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob))


@dataclass
class _Tokenized:
    """What the tokenizing pass counted: files and seconds of audio per split, each split's speed in this run
    (seconds of audio per second of work; None where it had nothing left to do), and the inputs left out."""
    files: dict[str, int]
    seconds: dict[str, float]
    rtf: dict[str, float | None]
    problems: Problems


def _tokenizer(cfg: AudioDomain, opts: PrepareConfig, codebook: np.ndarray | None, n_files: int):
    """The tokenizer, and how the tokenizing pass runs it: (tokenizer, workers, worker initializer, its args)."""
    if cfg.tokenizer == AudioTokenizer.encodec:  # one model, its own torch threads, in this process
        tok = _WORKER["tok"] = make_tokenizer(cfg)
        return tok, 1, None, ()
    tok = make_tokenizer(cfg)
    if codebook is not None:
        tok.codebook = torch.from_numpy(codebook)
    return tok, worker_count(opts, n_files, per_worker_mb=WORKER_MB), _init_worker, (cfg, codebook, 1)


def _tokenize_files(w: corpus.CorpusWriter, plan: dict, cfg: AudioDomain, opts: PrepareConfig,
                    codebook: np.ndarray | None) -> tuple[object, _Tokenized]:
    """Every planned file tokenized by parallel workers and appended in order to its split, committed every few
    seconds; a resumed prepare goes on after the files its last commit holds."""
    jobs = [(s, p) for s in corpus.SPLITS for p in plan["splits"][s]]
    tok, workers, init, initargs = _tokenizer(cfg, opts, codebook, len(jobs) - w.done)
    w.begin(corpus.token_dtype(tok.vocab_size), tok.vocab_size)
    problems = Problems(cfg.on_error, "audio", w.stats.get("problems", plan["problems"]))
    zero = {s: 0 for s in corpus.SPLITS}
    stats = {"files": dict(zero), "seconds": dict(zero), **{k: v for k, v in w.stats.items() if k != "problems"}}
    state = lambda: {**stats, "problems": problems.state()}  # noqa: E731
    commit = Committer(w)
    rtf, done_seconds, t_split = {}, 0.0, time.perf_counter()
    results = ordered_map(_tokenize, [p for _, p in jobs[w.done:]], workers, init, initargs)
    for k, res in enumerate(tqdm(results, total=len(jobs) - w.done, desc="tokenize audio",
                                 disable=len(jobs) < 50), w.done):
        split, path = jobs[k]
        if isinstance(res, str):
            problems.skip(path, res)
        else:
            w.append(split, res[0])
            stats["files"][split] += 1
            stats["seconds"][split] += res[1]
            done_seconds += res[1]
        if k + 1 == len(jobs) or jobs[k + 1][0] != split:  # the split's last file: its speed in this run
            now = time.perf_counter()
            rtf[split] = done_seconds / (now - t_split) if done_seconds else None
            done_seconds, t_split = 0.0, now
        commit(k + 1, state)
    commit(len(jobs), state, force=True)
    return tok, _Tokenized(stats["files"], stats["seconds"], rtf, problems)


def _meta(cfg: AudioDomain, tok, w: corpus.CorpusWriter, done: _Tokenized, n_transcripts: int | None,
          input_hash: str) -> dict:
    seconds = done.seconds
    return {
        "domain": cfg.name, "source": str(cfg.source), "tokenizer": str(cfg.tokenizer),
        "vocab_size": tok.vocab_size, "sample_rate": tok.rate, "files": done.files, "seconds": seconds,
        "hours": {s: v / 3600 for s, v in seconds.items()}, "units": {"second": seconds},
        "tokens_per_second": {s: w.tokens(s) / seconds[s] for s in corpus.SPLITS},
        "seconds_per_token": seconds["val"] / max(1, w.tokens("val")),
        "token_classes": tok.token_classes(), "realtime_factor": done.rtf, **done.problems.state(),
        "n_transcripts": n_transcripts or 0, "settings": corpus.settings_of(cfg), "input_hash": input_hash,
    }
