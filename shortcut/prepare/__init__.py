"""`shortcut prepare`: turn a domain's raw source into a token corpus (see shortcut.corpus for the format)."""

from __future__ import annotations

from pathlib import Path

from shortcut.config import AudioDomain, MusicDomain, PrepareJob, TextDomain


def prepare(job: PrepareJob) -> Path:
    root = Path(job.data.root)
    if isinstance(job.domain, TextDomain):
        from shortcut.prepare.text import prepare_text

        return prepare_text(job.domain, root, job.prepare)
    if isinstance(job.domain, MusicDomain):
        from shortcut.prepare.music import prepare_music

        return prepare_music(job.domain, root, job.prepare)
    if isinstance(job.domain, AudioDomain):
        from shortcut.prepare.audio import prepare_audio

        return prepare_audio(job.domain, root, job.prepare)
    raise ValueError(f"domain {job.domain.name!r} has no prepare step")
