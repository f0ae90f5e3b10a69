"""Symbolic music corpora: the music21 corpus (offline), MAESTRO v3 and local MIDI files, tokenized by miditok.

Splits are by piece, never inside one. Each piece becomes BOS, its tokens, EOS. The fitted tokenizer is saved as
tokenizer.json beside the corpus, so tokens decode back to MIDI and eval can report NLL per note.
Streaming (issue 14): a first parallel pass reads every file once to find the usable ones (the split is made among
those), a second tokenizes them piece by piece in parallel and appends the tokens in order, so memory holds a few
pieces at a time, never the collection.
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

from shortcut import corpus, diskio
from shortcut.config import MusicDomain, MusicSource, PrepareConfig, UserError
from shortcut.download import local_or_download
from shortcut.prepare.common import (Committer, Problems, RunTokenizer, already_done, find_files, inputs_of, kept, ordered_map,
                                     split_whole, survey, worker_count)

log = logging.getLogger(__name__)

MAESTRO_URL = "https://storage.googleapis.com/magentadata/datasets/maestro/v3.0.0/maestro-v3.0.0-midi.zip"
# The MAESTRO page publishes the archive's size but no checksum we could confirm: none is checked.
MAESTRO_HASH = None
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


def tokenizer_blob(tok) -> bytes:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tok.save(tmp_dir)
        return (Path(tmp_dir) / "tokenizer.json").read_bytes()


def tokenizer_from_blob(blob: bytes):
    with tempfile.TemporaryDirectory() as tmp_dir:
        (Path(tmp_dir) / "tokenizer.json").write_bytes(blob)
        return load_tokenizer(tmp_dir)


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
            with diskio.guard(Path(dest), "a converted MIDI file", cleanup=(Path(dest + ".tmp"),)):
                score.write("midi", fp=dest + ".tmp")
                os.replace(dest + ".tmp", dest)
            written.append(dest)
        except diskio.DiskError:  # a full disk is not this score's fault: stop, naming the place
            raise
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


def _music21_source(cfg: MusicDomain, root: Path, opts: PrepareConfig):
    """Convert the collection's scores to MIDI once, cached under <root>/downloads/music21/<collection>/."""
    works = music21_works(cfg.collection)
    cache = root / "downloads" / "music21" / cfg.collection
    cache.mkdir(parents=True, exist_ok=True)
    index_file = cache / "index-v2.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    workers = worker_count(opts, len(works))
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
                diskio.atomic_write(index_file, json.dumps(index, indent=1), "the converted works' index")
    works = needed
    failed = {name: err for w in works for name, err in index[w]["errors"].items()}
    paths = [Path(p) for w in works for p in index[w]["files"]]
    return (paths[: cfg.max_pieces] if cfg.max_pieces else paths), failed


def _files_source(cfg: MusicDomain, root: Path, opts: PrepareConfig):
    paths = find_files(cfg.files, "midi/**/*.mid", MIDI_SUFFIXES)
    return (paths[: cfg.max_pieces] if cfg.max_pieces else paths), {}


def _maestro_source(cfg: MusicDomain, root: Path, opts: PrepareConfig):
    alternative = ("Give a local copy with domain.path=/path/to/maestro-v3.0.0-midi.zip (or its extracted folder), "
                   "or use domain.source=music21 (offline) or domain.source=files domain.files='midi/*.mid'.")
    src = local_or_download(cfg.path, MAESTRO_URL, root / "downloads" / "maestro-v3.0.0-midi.zip", "MAESTRO v3",
                            "the MAESTRO zip or its folder", alternative, want_file=False, known_hash=MAESTRO_HASH)
    if src.is_file():  # extract once next to the cache
        folder = root / "downloads" / "maestro-v3.0.0"
        if not (folder / ".complete").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            try:
                with diskio.guard(tmp, "the extracted MAESTRO archive", cleanup=(tmp,)), zipfile.ZipFile(src) as z:
                    z.extractall(tmp)
            except (zipfile.BadZipFile, EOFError) as exc:
                raise UserError(f"{src} is a damaged zip archive ({exc}); download it again or give the "
                                f"extracted folder with domain.path=") from None
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
            if row.get("split") not in MAESTRO_SPLITS or not row.get("midi_filename"):
                raise UserError(f"{csvs[0]} has a row without a known split or midi_filename ({dict(row)}); is it "
                                f"the MAESTRO metadata file?")
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


def _check(path: str) -> str | None:
    """Worker: None when the file is usable MIDI, else why not."""
    try:
        _read_score(Path(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is skipped and named
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    return None


_WORKER: dict = {}


def _init_worker(blob: bytes, cfg: MusicDomain) -> None:
    _WORKER["tok"], _WORKER["cfg"] = tokenizer_from_blob(blob), cfg


def _tokenize(path: str):
    """Worker: (token ids, notes the tokenizer represents, all notes) of one piece, or why it cannot be read."""
    try:
        score = _read_score(Path(path))
        ids = np.asarray(encode_piece(_WORKER["tok"], score), dtype=np.int64)
        return ids, count_notes(score, _WORKER["cfg"]), int(score.note_num())
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def _plan(found, cfg: MusicDomain, opts: PrepareConfig, problems: Problems) -> dict:
    """Check every input once (in parallel), then split the usable ones (or keep the dataset's own split)."""
    inputs = inputs_of(found)
    usable = set()
    checks = ordered_map(_check, [str(p) for p in inputs], worker_count(opts, len(inputs)))
    for path, error in zip(inputs, tqdm(checks, total=len(inputs), desc="check MIDI", disable=len(inputs) < 200)):
        if error:
            problems.skip(path, error)
        else:
            usable.add(path)
    if isinstance(found, list):
        splits = split_whole([p for p in found if p in usable], cfg.val_frac, cfg.test_frac)
    else:
        splits = {s: [p for p in found[s] if p in usable] for s in corpus.SPLITS}
    empty = [s for s in corpus.SPLITS if not splits[s]]
    if empty:
        raise no_usable_midi(empty, problems, cfg)
    return {"splits": {s: [str(p) for p in v] for s, v in splits.items()}, "problems": problems.state()}


def no_usable_midi(empty: list[str], problems: Problems, cfg: MusicDomain) -> UserError:
    """Why splits ended up empty, in one line: the files the dataset lists that are not there, the unreadable ones,
    or none found at all; and what to do about it."""
    missing = {k: n for k, n in problems.n_missing.items() if k.split("/")[0] in (*empty, "all")}
    why = []
    if missing:
        examples = [p for k in missing for p in problems.missing.get(k, [])[:2]][:3]
        why.append(f"{sum(missing.values())} file(s) the dataset lists are missing "
                   f"({', '.join(f'{n} of {k}' for k, n in missing.items())}; e.g. {', '.join(examples)})")
    if problems.n_skipped:
        why.append(f"{problems.n_skipped} file(s) skipped as unreadable (e.g. "
                   f"{'; '.join(f'{p}: {r}' for p, r in list(problems.skipped.items())[:3])})")
    if not why:
        why.append("no MIDI files were found for them")
    if missing and cfg.source == MusicSource.maestro:
        fix = ("complete the MAESTRO folder (extract maestro-v3.0.0-midi.zip again, or give the complete archive or "
               "folder with domain.path=)")
    elif missing:
        fix = "complete the dataset folder"
    else:
        fix = "give readable MIDI files (domain.files=...)"
    return UserError(f"no usable MIDI left for the {'/'.join(empty)} split(s): {'; '.join(why)}; {fix}")


def prepare_music(cfg: MusicDomain, root: Path, opts: PrepareConfig | None = None, given: RunTokenizer | None = None,
                  out: Path | None = None) -> Path:
    """The corpus of cfg under root (or at out). given: tokenize with a trained run's tokenizer.json instead of
    making one (and learning no BPE merges): eval.shift."""
    opts = opts or PrepareConfig()
    out = out or corpus.corpus_dir(root, cfg)
    found, failed = SOURCES[cfg.source](cfg, root, opts)
    problems = Problems(cfg.on_error, "MIDI")
    for name, error in failed.items():
        problems.skip(name, error)
    found, input_hash = survey(found, json.dumps(corpus.settings_of(cfg), sort_keys=True) + (given.key if given else ""),
                               problems)
    if already_done(out, input_hash, problems):
        problems.report()
        return out
    with corpus.CorpusWriter(out, input_hash) as w:
        plan = kept(w, "plan.json", lambda: _plan(found, cfg, opts, problems))
        tok_blob = given.blob if given is not None else kept(
            w, "tokenizer.json", lambda: tokenizer_blob(_fit_tokenizer(cfg, plan["splits"]["train"])), bytes, bytes)
        vocab_size = len(tokenizer_from_blob(tok_blob))
        stats, problems = _tokenize_pieces(w, plan, cfg, opts, tok_blob, vocab_size)
        pieces, notes = stats["pieces"], stats["notes"]
        empty = [s for s in corpus.SPLITS if not pieces[s]]
        if empty:
            raise no_usable_midi(empty, problems, cfg)
        meta = {
            "domain": cfg.name, "source": str(cfg.source), "tokenizer": str(cfg.tokenizer),
            "bpe_vocab": cfg.bpe_vocab, "vocab_size": vocab_size, "pieces": pieces, "notes": notes,
            "units": {"note": notes}, **problems.state(), "settings": corpus.settings_of(cfg),
            "input_hash": input_hash, "notes_outside_range": stats["outside"],
            **({"run_tokenizer": given.key} if given is not None else {}),
        }
        meta = w.finish(meta, extra_files={"tokenizer.json": tok_blob})
    log.info("wrote %s: %s tokenizer%s, vocab %d; pieces %s, notes %s, tokens %s", out, cfg.tokenizer,
             f" + BPE {cfg.bpe_vocab}" if cfg.bpe_vocab else "", vocab_size,
             "/".join(str(pieces[s]) for s in corpus.SPLITS), "/".join(f"{notes[s]:,}" for s in corpus.SPLITS),
             "/".join(f"{meta['tokens'][s]:,}" for s in corpus.SPLITS))
    problems.report()
    return out


def _fit_tokenizer(cfg: MusicDomain, train: list[str]):
    """The domain's miditok tokenizer, with BPE merges learnt on the training pieces when domain.bpe_vocab asks."""
    tok = make_tokenizer(cfg)
    if cfg.bpe_vocab:
        if cfg.bpe_vocab <= len(tok):
            raise UserError(f"domain.bpe_vocab={cfg.bpe_vocab} must exceed the base vocabulary ({len(tok)})")
        # miditok reads the training pieces itself; it holds their token ids while it learns the merges.
        tok.train(vocab_size=cfg.bpe_vocab, model="BPE", files_paths=[Path(p) for p in train])
    return tok


def _tokenize_pieces(w: corpus.CorpusWriter, plan: dict, cfg: MusicDomain, opts: PrepareConfig, tok_blob: bytes,
                     vocab_size: int) -> tuple[dict, Problems]:
    """Every planned piece tokenized by parallel workers and appended in order to its split, committed every few
    seconds; a resumed prepare goes on after the pieces its last commit holds. Returns the counts (notes and pieces
    per split) and the inputs left out."""
    w.begin(corpus.token_dtype(vocab_size), vocab_size)
    problems = Problems(cfg.on_error, "MIDI", w.stats.get("problems", plan["problems"]))
    stats = {"notes": {s: 0 for s in corpus.SPLITS}, "pieces": {s: 0 for s in corpus.SPLITS},
             "outside": {s: 0 for s in corpus.SPLITS}, **{k: v for k, v in w.stats.items() if k != "problems"}}
    jobs = [(s, p) for s in corpus.SPLITS for p in plan["splits"][s]]
    workers = worker_count(opts, len(jobs) - w.done)
    commit = Committer(w)
    results = ordered_map(_tokenize, [p for _, p in jobs[w.done:]], workers, _init_worker, (tok_blob, cfg))
    for k, result in enumerate(tqdm(results, total=len(jobs) - w.done, desc="tokenize MIDI",
                                    disable=len(jobs) < 200), w.done):
        split, path = jobs[k]
        if isinstance(result, str):
            problems.skip(path, result)
        else:
            w.append(split, result[0])
            stats["notes"][split] += result[1]
            stats["outside"][split] += result[2] - result[1]  # outside the pitch range: not in the tokens
            stats["pieces"][split] += 1
        commit(k + 1, lambda: {**stats, "problems": problems.state()})
    commit(len(jobs), lambda: {**stats, "problems": problems.state()}, force=True)
    return stats, problems
