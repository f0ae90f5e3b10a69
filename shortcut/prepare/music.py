"""Symbolic music corpora: the music21 corpus (offline), MAESTRO v3 and local MIDI files, tokenized by miditok.

Splits are by piece, never inside one. Each piece becomes BOS, its tokens, EOS. The fitted tokenizer is saved as
tokenizer.json beside the corpus, so tokens decode back to MIDI and eval can report NLL per note.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shortcut import corpus
from shortcut.config import MusicDomain, MusicSource, UserError
from shortcut.download import local_or_download
from shortcut.prepare.common import (check_inputs, find_files, inputs_of, read_and_split, report_skipped,
                                     split_whole)

log = logging.getLogger(__name__)

MAESTRO_URL = "https://storage.googleapis.com/magentadata/datasets/maestro/v3.0.0/maestro-v3.0.0-midi.zip"
MAESTRO_SPLITS = {"train": "train", "validation": "val", "test": "test"}
MIDI_SUFFIXES = (".mid", ".midi")


# --- tokenizer ---

def make_tokenizer(cfg: MusicDomain):
    import miditok

    low, high = cfg.pitch_range
    config = miditok.TokenizerConfig(
        pitch_range=(low, high), beat_res={(0, 4): cfg.beat_res, (4, 12): max(1, cfg.beat_res // 2)},
        use_velocities=cfg.use_velocities, num_velocities=cfg.num_velocities, use_tempos=cfg.use_tempos,
        num_tempos=cfg.num_tempos, use_rests=cfg.use_rests, use_time_signatures=cfg.use_time_signatures,
        use_sustain_pedals=cfg.use_sustain_pedals, use_programs=cfg.use_programs,
        one_token_stream_for_programs=cfg.use_programs, special_tokens=["PAD", "BOS", "EOS"])
    return getattr(miditok, str(cfg.tokenizer))(config)


def load_tokenizer(corpus_path: Path):
    """The tokenizer a music corpus was made with (its class is recorded in tokenizer.json)."""
    import miditok

    params = Path(corpus_path) / "tokenizer.json"
    name = json.loads(params.read_text())["tokenization"]
    return getattr(miditok, name)(params=params)


def encode_piece(tok, score) -> list[int]:
    """BOS, the piece's tokens, EOS. Tracks go in the order decoding gives them (drums, then by program), so
    notes struck together are listed the same way after a trip through MIDI."""
    score = score.copy()
    score.tracks = sorted(score.tracks, key=lambda t: -1 if t.is_drum else t.program)
    seq = tok.encode(score)
    seqs = seq if isinstance(seq, list) else [seq]  # one sequence per track without programs
    ids = [i for s in seqs for i in s.ids]
    return [tok["BOS_None"], *ids, tok["EOS_None"]]


def count_notes(score, cfg: MusicDomain) -> int:
    """Notes the tokenizer can represent: inside the pitch range (drums always)."""
    low, high = cfg.pitch_range
    return sum(len(t.notes) if t.is_drum else sum(low <= n.pitch < high for n in t.notes) for t in score.tracks)


# --- sources: each gives the MIDI paths (split later, by piece, once unusable files are out) or, for a dataset
# with an official split, {split: [paths]}; and the works that failed before reaching MIDI ---

def _convert_music21(item: tuple[str, str]) -> dict:
    """Worker: one music21 corpus work to MIDI file(s) (an opus, like an Essen .abc file, gives one per song).
    Returns {"files": [written], "errors": {name: error}}: a song that fails is named, the others are kept."""
    from music21 import corpus as m21corpus, stream

    work, out = item
    written, errors = [], {}
    try:
        parsed = m21corpus.parse(work)
    except Exception as exc:  # noqa: BLE001 - reported per work, the rest go on
        return {"files": [], "errors": {work: f"{type(exc).__name__}: {str(exc)[:200]}"}}
    scores = list(parsed.scores) if isinstance(parsed, stream.Opus) else [parsed]
    for i, score in enumerate(scores):
        dest = f"{out}-{i}.mid" if len(scores) > 1 else f"{out}.mid"
        try:
            score.write("midi", fp=dest + ".tmp")
            os.replace(dest + ".tmp", dest)
            written.append(dest)
        except Exception as exc:  # noqa: BLE001 - music21 cannot write some scores; name them and go on
            errors[f"{work}#{i}" if len(scores) > 1 else work] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return {"files": written, "errors": errors}


def music21_works(collection: str) -> list[str]:
    from music21 import corpus as m21corpus

    if collection == "bach":  # the chorales (Riemenschneider), not all of Bach
        from music21.corpus import chorales

        return sorted(set(chorales.Iterator(returnType="filename")))
    works = sorted(str(p) for p in m21corpus.getComposer(collection))
    if not works:
        folders = sorted({Path(p).parent.name for p in m21corpus.getPaths()})
        raise UserError(f"domain.collection={collection!r} is not in the music21 corpus; try bach, essenFolksong, "
                        f"or one of: {', '.join(folders[:30])}")
    return works


def _music21_source(cfg: MusicDomain, root: Path):
    """Convert the collection's scores to MIDI once, cached under <root>/downloads/music21/<collection>/."""
    works = music21_works(cfg.collection)
    cache = root / "downloads" / "music21" / cfg.collection
    cache.mkdir(parents=True, exist_ok=True)
    index_file = cache / "index-v2.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    workers = os.cpu_count() or 1
    # Convert in batches, in order, and stop once max_pieces pieces exist (an opus holds hundreds of songs).
    needed = []
    with ProcessPoolExecutor(workers) as pool, tqdm(total=len(works), desc=f"music21 {cfg.collection} -> MIDI") as bar:
        for start in range(0, len(works), 2 * workers):
            if cfg.max_pieces and sum(len(index[w]["files"]) for w in needed) >= cfg.max_pieces:
                break
            batch = works[start:start + 2 * workers]
            todo = [(w, str(cache / Path(w).name.replace(".", "_"))) for w in batch if w not in index]
            for (work, _), result in zip(todo, pool.map(_convert_music21, todo)):
                index[work] = result
            needed += batch
            bar.update(len(batch))
            if todo:
                tmp = index_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(index, indent=1))
                tmp.replace(index_file)
    works = needed
    failed = {name: err for w in works for name, err in index[w]["errors"].items()}
    paths = [Path(p) for w in works for p in index[w]["files"]]
    return (paths[: cfg.max_pieces] if cfg.max_pieces else paths), failed


def _files_source(cfg: MusicDomain, root: Path):
    paths = find_files(cfg.files, "midi/**/*.mid", MIDI_SUFFIXES)
    return (paths[: cfg.max_pieces] if cfg.max_pieces else paths), {}


def _maestro_source(cfg: MusicDomain, root: Path):
    alternative = ("Give a local copy with domain.path=/path/to/maestro-v3.0.0-midi.zip (or its extracted folder), "
                   "or use domain.source=music21 (offline) or domain.source=files domain.files='midi/*.mid'.")
    src = local_or_download(cfg.path, MAESTRO_URL, root / "downloads" / "maestro-v3.0.0-midi.zip", "MAESTRO v3",
                            "the MAESTRO zip or its folder", alternative, want_file=False)
    if src.is_file():  # extract once next to the cache
        folder = root / "downloads" / "maestro-v3.0.0"
        if not (folder / ".complete").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            with zipfile.ZipFile(src) as z:
                z.extractall(tmp)
            inner = [p for p in tmp.iterdir() if p.is_dir()]
            tmp_root = inner[0] if len(inner) == 1 and not list(tmp.glob("*.csv")) else tmp
            (tmp_root / ".complete").write_text("")
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            tmp_root.rename(folder)
        src = folder
    csvs = sorted(src.glob("maestro-v*.csv")) or sorted(src.glob("*/maestro-v*.csv"))
    if not csvs:
        raise UserError(f"{src} has no maestro-v*.csv metadata file; is it the MAESTRO MIDI archive?")
    base = csvs[0].parent
    splits: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    with open(csvs[0], newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            splits[MAESTRO_SPLITS[row["split"]]].append(base / row["midi_filename"])
    if cfg.max_pieces:
        splits = {s: p[: max(1, cfg.max_pieces // 3)] for s, p in splits.items()}
    return splits, {}


SOURCES = {MusicSource.music21: _music21_source, MusicSource.files: _files_source, MusicSource.maestro: _maestro_source}


def _read_score(path: Path):
    import symusic

    score = symusic.Score(str(path))
    if score.note_num() == 0:
        raise ValueError("no notes")
    return score


def prepare_music(cfg: MusicDomain, root: Path) -> Path:
    out = corpus.corpus_dir(root, cfg)
    found, failed = SOURCES[cfg.source](cfg, root)
    input_hash, done = check_inputs(out, inputs_of(found), json.dumps(corpus.settings_of(cfg), sort_keys=True))
    if done:
        return out
    tok = make_tokenizer(cfg)
    skipped: dict[str, str] = {str(k): v for k, v in failed.items()}
    splits, readable = read_and_split(found, _read_score, skipped,
                                      lambda paths: split_whole(paths, cfg.val_frac, cfg.test_frac), "MIDI")
    scores = {s: [(p, readable[p]) for p in splits[s]] for s in corpus.SPLITS}
    if cfg.bpe_vocab:
        if cfg.bpe_vocab <= len(tok):
            raise UserError(f"domain.bpe_vocab={cfg.bpe_vocab} must exceed the base vocabulary ({len(tok)})")
        tok.train(vocab_size=cfg.bpe_vocab, model="BPE", files_paths=[p for p, _ in scores["train"]])
    tokens, notes, pieces = {}, {}, {}
    for split in corpus.SPLITS:
        ids: list[int] = []
        for path, score in tqdm(scores[split], desc=f"tokenize {split}", disable=len(scores[split]) < 20):
            ids.extend(encode_piece(tok, score))
        tokens[split] = np.asarray(ids, dtype=np.int64)
        notes[split] = sum(count_notes(s, cfg) for _, s in scores[split])
        pieces[split] = len(scores[split])
    with tempfile.TemporaryDirectory() as tmp_dir:
        tok.save(tmp_dir)
        blob = (Path(tmp_dir) / "tokenizer.json").read_bytes()
    meta = {
        "domain": cfg.name, "source": str(cfg.source), "tokenizer": str(cfg.tokenizer), "bpe_vocab": cfg.bpe_vocab,
        "vocab_size": len(tok), "pieces": pieces, "notes": notes, "units": {"note": notes},
        "skipped": skipped, "n_skipped": len(skipped), "settings": corpus.settings_of(cfg),
        "input_hash": input_hash,
    }
    meta = corpus.write_corpus(out, tokens, meta, extra_files={"tokenizer.json": blob})
    log.info("wrote %s: %s tokenizer%s, vocab %d; pieces %s, notes %s, tokens %s", out, cfg.tokenizer,
             f" + BPE {cfg.bpe_vocab}" if cfg.bpe_vocab else "", len(tok),
             "/".join(str(pieces[s]) for s in corpus.SPLITS), "/".join(f"{notes[s]:,}" for s in corpus.SPLITS),
             "/".join(f"{meta['tokens'][s]:,}" for s in corpus.SPLITS))
    report_skipped(skipped)
    return out
