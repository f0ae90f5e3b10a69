"""Audio tokenization speed: real-time factor (seconds of audio per second of compute) of mulaw and kmeans.

Target (issue 4): both at least 100x faster than real time on 2 CPU cores. Synthetic speech-like audio: tones,
chirps and noise bursts with pauses, 10 minutes in 30 s utterances. Prints one line per tokenizer.
"""

import time

import numpy as np
import torch

from shortcut.cli import compose
from shortcut.prepare.audio import KMeansCodes, MuLaw


def utterances(rate: int, n: int = 20, seconds: float = 30.0) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        t = np.arange(int(seconds * rate)) / rate
        x = 0.3 * np.sin(2 * np.pi * (120 + 300 * rng.random()) * t * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t)))
        x += 0.05 * rng.standard_normal(len(t))
        x *= (np.sin(2 * np.pi * 0.7 * t) > -0.3)  # pauses
        out.append(x.astype(np.float32))
    return out


def main() -> None:
    print(f"torch threads: {torch.get_num_threads()}")
    cfg = compose("prepare", ["domain=audio"]).domain
    for name, tok in (("mulaw", MuLaw(8000)), ("kmeans", KMeansCodes(cfg))):
        wavs = utterances(tok.rate)
        seconds = sum(len(w) for w in wavs) / tok.rate
        if isinstance(tok, KMeansCodes):
            t0 = time.perf_counter()
            tok.fit(wavs)
            print(f"kmeans fit: {len(wavs)} utterances, {cfg.codebook_size} codes in {time.perf_counter() - t0:.1f} s")
        tok.encode(wavs[0])  # warm-up
        t0 = time.perf_counter()
        n = sum(len(tok.encode(w)) for w in wavs)
        elapsed = time.perf_counter() - t0
        print(f"{name:7s} {seconds / 60:.1f} min of audio -> {n:,} tokens in {elapsed:.3f} s: "
              f"{seconds / elapsed:,.0f}x real time (target >= 100x)")


if __name__ == "__main__":
    main()
