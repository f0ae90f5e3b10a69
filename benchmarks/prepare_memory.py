"""Peak memory and throughput of `shortcut prepare` at two corpus sizes per domain (issue 14).

Targets: peak memory under prepare.max_memory_mb and flat in corpus size (within 10% between the two sizes); audio
k-means tokenization >= 1,000x real time end to end (decode included) on 2 cores; text >= 50 MB/s.

Inputs are generated here, in the real datasets' layouts, under data/bench/ (reused by later runs):
  text   one UTF-8 file of English-like text (the shape of text8), --text-mb sizes (default 100 and 1000 MB)
  audio  a LibriSpeech/ folder (train-clean-100, dev-clean, test-clean; 16 kHz FLAC, ~15 s utterances) of synthetic
         speech-like sound, --audio-hours sizes (default 2 and 20 h)
  music  a MAESTRO-layout folder (CSV + MIDI), --music-pieces sizes (default 200 and 2000)
Each prepare runs as `python -m shortcut prepare ...` in a fresh data root. Memory, from /proc: the sum over the
process tree of each process' own peak RSS (VmHWM: exact, and an upper bound of the tree's peak since shared pages
count in every process and the peaks need not coincide), the largest process' peak, and the peak over time of the
tree's summed PSS (shared pages counted once) and RSS, sampled every 0.05 s. Throughput is input size over the
whole prepare's wall time (plan, codebook fit, tokenizing, writing); for audio, the tokenizing pass alone is also
shown (meta.json's realtime_factor of the train split). Outputs go to data/bench/out-*/ and are removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "data" / "bench"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there been one all we their has would when if so no will can more out up into do any your "
         "what some time could other than then now only its over also after first two may these new people such our "
         "most should very well way just because good those how even back through much before where right must make "
         "great being down little own old see same world long thing music speech layer model token attention").split()


# --- inputs ---

def make_text(mb: int) -> Path:
    path = BENCH / f"text-{mb}mb" / "corpus.txt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = []
    for _ in range(40_000):  # ~3 MB of distinct lines, shuffled anew for each block
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        lines.append(" ".join(words).capitalize() + rng.choice(".?!"))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        written = 0
        while written < mb * 2**20:
            rng.shuffle(lines)
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block)
    tmp.rename(path)
    return path


def utterance(rng: np.random.Generator, seconds: float, rate: int = 16000) -> np.ndarray:
    """Speech-like sound: voiced syllables (a gliding pitch with harmonics under a syllable envelope), noise bursts
    for fricatives, and pauses."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 0.8) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None) ** 2
    noise = rng.standard_normal(n) * (np.sin(2 * np.pi * rng.uniform(1, 2) * t) > 0.85)
    pauses = np.repeat(rng.random(int(seconds * 2) + 1) > 0.15, rate // 2)[:n]
    x = (0.5 * voiced * syllables + 0.1 * noise) * pauses
    return (0.8 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def make_librispeech(hours: float) -> Path:
    """LibriSpeech/{train-clean-100,dev-clean,test-clean}/SPEAKER/CHAPTER/*.flac + transcripts; train holds
    `hours`, dev and test 5% each. 200 distinct utterances are encoded; the others are byte copies under their own
    names (decoding costs the same)."""
    import soundfile as sf

    folder = BENCH / f"audio-{hours:g}h"
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    pool = []
    for i in range(200):
        buf = folder / "pool" / f"{i}.flac"
        buf.parent.mkdir(parents=True, exist_ok=True)
        sf.write(buf, utterance(rng, rng.uniform(10, 20)), 16000, subtype="PCM_16")
        pool.append((buf.read_bytes(), sf.info(buf).duration))
    k = 0
    for subset, share, first in (("train-clean-100", 1.0, 1000), ("dev-clean", 0.05, 8000), ("test-clean", 0.05, 9000)):
        seconds, speaker = 0.0, first
        while seconds < hours * 3600 * share:
            speaker += 1
            chapter = folder / "LibriSpeech" / subset / str(speaker) / "10"
            chapter.mkdir(parents=True)
            lines = []
            for u in range(25):
                blob, dur = pool[k % len(pool)]
                k += 1
                name = f"{chapter.parent.name}-10-{u:04d}"
                (chapter / f"{name}.flac").write_bytes(blob)
                lines.append(f"{name} SYNTHETIC SPEECH {u}")
                seconds += dur
            (chapter / f"{chapter.parent.name}-10.trans.txt").write_text("\n".join(lines) + "\n")
    shutil.rmtree(folder / "pool")
    (folder / ".complete").write_text("")
    return folder


def make_maestro(pieces: int) -> Path:
    from symusic import Note, Score, Tempo, TimeSignature, Track

    folder = BENCH / f"music-{pieces}" / "maestro-v3.0.0"
    if (folder / "maestro-v3.0.0.csv").is_file():
        return folder
    rng = random.Random(0)
    rows = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
    (folder / "2018").mkdir(parents=True, exist_ok=True)
    for i in range(pieces):
        score = Score(480)
        score.time_signatures.append(TimeSignature(0, 4, 4))
        score.tempos.append(Tempo(0, 90.0 + i % 40))
        track = Track(name="piano", program=0, is_drum=False)
        t = 0
        while t < 480 * 4 * 64:  # 64 bars, one or two notes at a time
            dur = rng.choice([120, 240, 480])
            for _ in range(rng.choice([1, 1, 2])):
                track.notes.append(Note(t, dur, rng.randint(36, 96), rng.randint(30, 110)))
            t += dur
        score.tracks.append(track)
        score.dump_midi(str(folder / "2018" / f"p{i}.midi"))
        split = "test" if i % 10 == 0 else "validation" if i % 10 == 1 else "train"
        rows.append(f"Bench,Piece {i},{split},2018,2018/p{i}.midi,2018/p{i}.wav,100.0")
    (folder / "maestro-v3.0.0.csv").write_text("\n".join(rows) + "\n")
    return folder


# --- measuring ---

def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def memory(pids: list[int], hwm: dict[int, int]) -> tuple[int, int]:
    """(summed RSS, summed PSS) in kB now; hwm[pid] is updated with each process' own peak RSS (VmHWM)."""
    rss = pss = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmHWM:"):
                    hwm[p] = max(hwm.get(p, 0), int(line.split()[1]))
        except OSError:
            pass
    return rss, pss


def run_prepare(overrides: list[str], root: Path) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    cmd = [sys.executable, "-m", "shortcut", "prepare", f"data.root={root}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, hwm = {"rss": 0, "pss": 0}, {}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for key, value in zip(("rss", "pss"), memory(tree(proc.pid), hwm)):
                peak[key] = max(peak[key], value)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    stop.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({' '.join(cmd)}):\n{output[-3000:]}")
    metas = list(root.glob("*/*/meta.json"))
    return {"wall_s": wall, "peak_rss_mb": peak["rss"] / 1024, "peak_pss_mb": peak["pss"] / 1024,
            "max_process_mb": max(hwm.values()) / 1024, "sum_hwm_mb": sum(hwm.values()) / 1024,
            "meta": json.loads(metas[0].read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domains", default="text,audio,music")
    ap.add_argument("--text-mb", default="100,1000")
    ap.add_argument("--audio-hours", default="2,20")
    ap.add_argument("--music-pieces", default="200,2000")
    ap.add_argument("--max-memory-mb", type=int, default=2048)
    ap.add_argument("--workers", default=None, help="prepare.workers (default: all cores)")
    args = ap.parse_args()
    common = [f"prepare.max_memory_mb={args.max_memory_mb}"] + ([f"prepare.workers={args.workers}"]
                                                                 if args.workers else [])
    cores = len(os.sched_getaffinity(0))
    rows = []
    for domain in args.domains.split(","):
        sizes = {"text": args.text_mb, "audio": args.audio_hours, "music": args.music_pieces}[domain].split(",")
        for size in sizes:
            if domain == "text":
                src = make_text(int(size))
                r = run_prepare(["domain=text", "domain.source=files", f"domain.files={src}", *common],
                                BENCH / "out-text")
                amount, label = src.stat().st_size / 2**20, f"{size} MB"
                speed = f"{amount / r['wall_s']:.0f} MB/s"
            elif domain == "audio":
                src = make_librispeech(float(size))
                r = run_prepare(["dataset=librispeech", f"domain.path={src}", "domain.train_subsets=[train-clean-100]",
                                 *common], BENCH / "out-audio")
                amount = sum(r["meta"]["seconds"].values())
                label = f"{amount / 3600:.1f} h"
                speed = (f"{amount / r['wall_s']:,.0f}x real time (tokenizing pass "
                         f"{r['meta']['realtime_factor']['train']:,.0f}x)")
            else:
                src = make_maestro(int(size))
                r = run_prepare(["dataset=maestro", f"domain.path={src}", *common], BENCH / "out-music")
                amount = sum(r["meta"]["notes"].values())
                label = f"{size} pieces"
                speed = f"{amount / r['wall_s']:,.0f} notes/s"
            rows.append((domain, label, r))
            print(f"{domain:5s} {label:>11s}: {r['wall_s']:7.1f} s, {speed}; peak memory: sum of the processes' "
                  f"peak RSS {r['sum_hwm_mb']:,.0f} MB (largest process {r['max_process_mb']:,.0f} MB), sampled "
                  f"tree PSS {r['peak_pss_mb']:,.0f} MB / RSS {r['peak_rss_mb']:,.0f} MB; bound "
                  f"{args.max_memory_mb} MB", flush=True)
        same = [r for d, _, r in rows if d == domain]
        if len(same) >= 2:
            ratio = same[-1]["sum_hwm_mb"] / same[-2]["sum_hwm_mb"]
            pss = same[-1]["peak_pss_mb"] / same[-2]["peak_pss_mb"]
            print(f"{domain:5s} larger / smaller corpus: summed peak RSS x{ratio:.2f}, sampled PSS x{pss:.2f} "
                  f"(target <= 1.10)")
    print(f"({cores} cores, prepare.max_memory_mb={args.max_memory_mb})")
    for out in BENCH.glob("out-*"):
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
