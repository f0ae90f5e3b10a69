"""`shortcut sample run_dir=DIR`: generate from a trained run and decode it as its domain would be heard or read.

Outputs go to DIR/samples/ (written beside it and swapped in at the end, so an interrupted run leaves the earlier
samples as they were): .txt (text), .mid plus a piano-roll .png (music, through the corpus' own miditok
tokenizer), .wav plus a spectrogram .png (audio: mu-law decodes exactly; k-means codes through their codebook's
log-mel frames, an inverse mel scale and Griffin-Lim; EnCodec through its decoder). samples.json lists every file
with its settings and the generation speed. The decoding itself (KV cache, early exits, speculative decoding) is
shortcut.generate's.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from shortcut import rundir
from shortcut.config import SampleConfig, SampleJob, UserError
from shortcut.data import TokenData
from shortcut.generate import generate

log = logging.getLogger(__name__)


# --- what a length costs ---

# Each generated token of each sample is one int64 in the token buffer (on the model's device); decoding a sample
# turns its tokens into Python ints (a list slot and an int object) and then into the codec's output.
TOKEN_BYTES, PYTHON_INT_BYTES = 8, 8 + 32


def memory_available(device: torch.device) -> int | None:
    """Bytes free on the device (CUDA), or the host's available memory (Linux /proc/meminfo); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(cfg: SampleConfig, prompt_len: int, codec, device: torch.device) -> None:
    """Refuse, in one line, a length whose tokens and decoded output do not fit (the KV cache does not grow: its
    window slides at block_size, so what grows with max_new_tokens is the output)."""
    length = prompt_len + cfg.max_new_tokens
    buffer = cfg.n * length * TOKEN_BYTES
    host = length * (PYTHON_INT_BYTES + codec.bytes_per_token) + (buffer if device.type != "cuda" else 0)
    wants = [(buffer, device)] if device.type == "cuda" else []
    wants.append((host, torch.device("cpu")))
    for need, where in wants:
        free = memory_available(where)
        if free is not None and need > free:
            per_token = need / length
            raise UserError(f"sample.max_new_tokens={cfg.max_new_tokens:,} with sample.n={cfg.n} needs about "
                            f"{need / 2**30:,.1f} GiB of {'GPU' if where.type == 'cuda' else 'host'} memory for the "
                            f"tokens and their decoded output, and {free / 2**30:,.1f} GiB is available; ask for at "
                            f"most about sample.max_new_tokens={max(1, int(free / per_token) - prompt_len):,}")


# --- what the tokens mean: each domain's prompt and output ---

class TextCodec:
    ext = ".txt"
    bytes_per_token = 32  # a few characters (up to 4 bytes each in a str), and their UTF-8 copy when written

    def __init__(self, data: TokenData):
        from shortcut.prepare.text import tokenizer_from_meta

        self.tok = tokenizer_from_meta(data.meta)

    def prompt(self, value: str, cfg: SampleConfig) -> list[int]:
        try:
            return self.tok.encode(value).tolist()
        except ValueError:
            raise UserError("sample.prompt has characters the corpus' vocabulary does not know (and no <unk>); "
                            "use characters from the training text") from None

    def write(self, ids: list[int], stem: Path) -> list[Path]:
        path = stem.with_suffix(".txt")
        path.write_text(self.tok.decode(ids), encoding="utf-8")
        return [path]


class MusicCodec:
    ext = ".mid"
    bytes_per_token = 64  # a fraction of a note in the decoded score, its MIDI bytes and piano-roll bar

    def __init__(self, data: TokenData):
        from shortcut.prepare.music import load_tokenizer

        self.tok = load_tokenizer(data.path)
        self.special = {self.tok[t] for t in ("PAD_None", "BOS_None", "EOS_None") if t in self.tok.vocab}

    def prompt(self, value: str, cfg: SampleConfig) -> list[int]:
        from symusic import Score

        from shortcut.prepare.music import encode_piece

        try:
            ids = encode_piece(self.tok, Score(value))[:-1]  # BOS and the piece, without its EOS
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(f"sample.prompt={value!r} is not a MIDI file this tokenizer reads ({exc})") from None
        bar = self.tok.vocab.get("Bar_None")
        if bar is not None:  # the first prompt_bars bars: cut at the bar line after them
            bars = [i for i, t in enumerate(ids) if t == bar]
            if len(bars) > cfg.prompt_bars:
                ids = ids[:bars[cfg.prompt_bars]]
        return ids[:cfg.prompt_tokens]

    def write(self, ids: list[int], stem: Path) -> list[Path]:
        ids = [i for i in ids if i not in self.special]
        # One stream for all tracks (Program tokens), or (without programs) the piece's one track
        score = self.tok.decode(ids if self.tok.config.one_token_stream_for_programs else [ids])
        path = stem.with_suffix(".mid")
        score.dump_midi(str(path))
        return [path, piano_roll(score, stem.with_suffix(".png"))]


class AudioCodec:
    ext = ".wav"

    def __init__(self, data: TokenData, domain: dict):
        from shortcut.config import AudioDomain
        from shortcut.prepare.audio import load_tokenizer

        fields = {k: v for k, v in domain.items() if k in AudioDomain.__dataclass_fields__}
        self.cfg = AudioDomain(**fields)
        self.tok = load_tokenizer(data.path, self.cfg)
        self.seconds_per_token = data.meta.get("seconds_per_token")
        # the waveform's samples in float64 and the copies writing it makes (clip, float32)
        self.bytes_per_token = int((self.seconds_per_token or 0.02) * self.tok.rate * 24) + 8

    def prompt(self, value: str, cfg: SampleConfig) -> list[int]:
        from shortcut.prepare.audio import load_audio

        try:
            wav = load_audio(Path(value), self.tok.rate)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"sample.prompt={value!r} is not an audio file soundfile reads ({exc})") from None
        wav = wav[: int(cfg.prompt_seconds * self.tok.rate)]
        return self.tok.encode(wav).tolist()[:cfg.prompt_tokens]

    def waveform(self, ids: list[int]) -> np.ndarray:
        from shortcut.prepare.audio import KMeansCodes, MuLaw

        if isinstance(self.tok, MuLaw):
            return self.tok.decode(ids)
        if isinstance(self.tok, KMeansCodes):
            return griffin_lim(self.tok, ids)
        return encodec_decode(self.tok, ids)

    def write(self, ids: list[int], stem: Path) -> list[Path]:
        import soundfile as sf

        wav = self.waveform(ids)
        path = stem.with_suffix(".wav")
        sf.write(str(path), np.clip(wav, -1, 1).astype(np.float32), self.tok.rate, subtype="PCM_16")
        return [path, spectrogram(wav, self.tok.rate, stem.with_suffix(".png"))]


def griffin_lim(tok, ids: list[int]) -> np.ndarray:
    """k-means codes -> their centroids' log-mel frames -> power spectrogram (inverse mel scale) -> Griffin-Lim."""
    import torchaudio

    mel = tok.features.mel  # the MelSpectrogram the corpus was made with
    frames = tok.codebook[torch.as_tensor(ids)].T.exp()  # (n_mels, frames): the log of (mel power + 1e-6), undone
    n_fft = mel.n_fft
    inverse = torchaudio.transforms.InverseMelScale(n_stft=n_fft // 2 + 1, n_mels=frames.shape[0],
                                                    sample_rate=tok.rate, f_min=mel.f_min, f_max=mel.f_max,
                                                    driver="gelsd")  # tolerates empty mel bands
    power = inverse(frames.float()).clamp_min(0)  # (n_fft/2+1, frames)
    gl = torchaudio.transforms.GriffinLim(n_fft=n_fft, win_length=mel.win_length, hop_length=mel.hop_length,
                                          power=2.0, n_iter=32)
    wav = gl(power).numpy()
    peak = np.abs(wav).max()
    return wav / peak * 0.9 if peak > 0 else wav


def encodec_decode(tok, ids: list[int]) -> np.ndarray:
    """Flattened EnCodec codes (frame by frame, codebook j offset by j * codebook_size) -> audio."""
    size, k = tok.model.config.codebook_size, tok.k
    ids = np.asarray(ids[: len(ids) // k * k]).reshape(-1, k)  # (frames, k)
    codes = torch.as_tensor(ids.T - (np.arange(k) * size)[:, None]).clamp(0, size - 1)  # (k, frames)
    with torch.no_grad():
        audio = tok.model.decode(codes[None, None], [None])[0]
    return audio[0, 0].numpy()


def piano_roll(score, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.5), layout="constrained")
    for track in score.tracks:
        for n in track.notes:
            ax.broken_barh([(n.time / score.ticks_per_quarter, n.duration / score.ticks_per_quarter)],
                           (n.pitch - 0.4, 0.8), color="tab:blue" if not track.is_drum else "tab:gray")
    ax.set(xlabel="beats", ylabel="MIDI pitch", title=f"{path.stem}: {sum(len(t.notes) for t in score.tracks)} notes")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def spectrogram(wav: np.ndarray, rate: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.5), layout="constrained")
    if len(wav) > 256:
        ax.specgram(wav, NFFT=256, Fs=rate, noverlap=128, cmap="magma")
    ax.set(xlabel="seconds", ylabel="Hz", title=f"{path.stem}: {len(wav) / rate:.2f} s")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def codec_for(data: TokenData, state):
    domain = data.meta["domain"]
    if domain == "text":
        return TextCodec(data)
    if domain == "music":
        return MusicCodec(data)
    if domain == "audio":
        return AudioCodec(data, state.config["domain"])
    raise UserError(f"no decoder for the {domain} domain")


# --- the command ---

def prompt_ids(cfg: SampleConfig, codec, data: TokenData) -> list[int]:
    if cfg.prompt:
        ids = codec.prompt(cfg.prompt, cfg)
        if not ids:
            raise UserError(f"sample.prompt={cfg.prompt!r} gives no tokens")
        return ids[-cfg.prompt_tokens:]
    if isinstance(codec, MusicCodec) and not cfg.from_test:
        return [codec.tok["BOS_None"]]
    n = cfg.prompt_tokens if cfg.from_test else 1
    return np.asarray(data.splits["test"][:n], dtype=np.int64).tolist()


def sample(job: SampleJob) -> dict:
    from shortcut.evaluate import load_run
    from shortcut.runtime import pick_device

    cfg, run_dir = job.sample, Path(job.run_dir)
    device = pick_device(cfg.device)
    model, data, state = load_run(run_dir, device, job.data_root)
    codec = codec_for(data, state)
    prompt = prompt_ids(cfg, codec, data)
    check_memory(cfg, len(prompt), codec, device)
    out_dir = run_dir / rundir.SAMPLES
    remove_stale(run_dir)
    tmp = run_dir / f"{PARTIAL}{os.getpid()}"  # beside samples/: the earlier samples stay until the new ones are done
    tmp.mkdir()
    try:
        gen = generate(model, torch.tensor([prompt] * cfg.n, device=device), cfg, progress=True)
        ids, tok_s = gen.tokens, gen.tokens_per_s
        settings = {k: (str(v) if not isinstance(v, (int, float, bool, type(None))) else v)
                    for k, v in vars(cfg).items()}
        files = []
        for i in range(ids.size(0)):
            row = ids[i].tolist()  # one sample's Python ints at a time
            written = codec.write(row, tmp / f"sample{i}")
            files.append({"files": [p.name for p in written], "prompt_tokens": len(prompt), "tokens": len(row)})
        record = {"run": str(run_dir), "checkpoint_step": state.step, "checkpoint_hash": state.weights_hash,
                  "cache": gen.cached, "decoder": gen.decoder, "tokens_per_s": tok_s,
                  "flops_per_token": gen.flops_per_token, "mean_exit_depth": gen.mean_exit_depth,
                  "acceptance": gen.acceptance, "draft_depth": gen.draft_depth,
                  "settings": settings, "samples": files}
        rundir.write_json(tmp / "samples.json", record)
        replace_dir(tmp, out_dir)  # samples of another model or other settings do not stay
    except KeyboardInterrupt:
        raise UserError(f"interrupted; {out_dir} still holds the earlier samples") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%d sample(s) of %d tokens at %.0f tokens/s -> %s", cfg.n, cfg.max_new_tokens, tok_s, out_dir)
    return record


PARTIAL = f".{rundir.SAMPLES}.partial-"  # + the writer's process id


def remove_stale(run_dir: Path) -> None:
    """Folders an earlier `shortcut sample` left when it was killed (its process is gone)."""
    for p in run_dir.glob(f".{rundir.SAMPLES}.*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(new: Path, old: Path) -> None:
    """Put the folder `new` where `old` is, then remove the earlier folder. One atomic step where the OS has it
    (Linux renameat2 with RENAME_EXCHANGE); else two renames, between which `old` is briefly absent."""
    if not old.exists():
        new.rename(old)
        return
    if not _exchange(new, old):
        aside = old.with_name(f".{old.name}.old-{os.getpid()}")
        old.rename(aside)
        new.rename(old)
        new = aside
    shutil.rmtree(new)  # now the earlier samples


def _exchange(a: Path, b: Path) -> bool:
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
