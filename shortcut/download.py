"""Downloads through pooch (a cache, checksums, retries), resumable after an interruption, and a fast, clear failure
when offline that names the local alternative."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from shortcut import diskio
from shortcut.config import UserError

log = logging.getLogger(__name__)


def require_network(url: str, what: str, alternative: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the offline alternative, when the host of url cannot be reached."""
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot download {what}: {host} is unreachable ({exc.__class__.__name__}); "
                        f"you seem to be offline. {alternative}") from None


class ResumableDownloader:
    """A pooch downloader that continues an interrupted download (an HTTP Range request from where the `.part` file
    ends) instead of starting over; a server that ignores the range sends the whole file, and that is fine too."""

    def __init__(self, part: Path, label: str, timeout: float = 60.0):
        self.part, self.label, self.timeout = Path(part), label, timeout

    def __call__(self, url: str, output_file: str, pooch_=None) -> None:
        import requests

        have = self.part.stat().st_size if self.part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as r:
            if not (have and r.status_code == 416):  # 416: the .part already holds the whole file
                r.raise_for_status()
                if r.status_code != 206:
                    have = 0
                size = int(r.headers.get("Content-Length") or 0)
                with open(self.part, "ab" if have else "wb") as f, \
                        tqdm(total=have + size or None, initial=have, unit="B", unit_scale=True,
                             desc=f"download {self.label}") as bar:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        shutil.move(str(self.part), output_file)  # pooch checks the checksum, then moves it into the cache


def download(url: str, dest: Path, what: str, alternative: str, known_hash: str | None = None) -> Path:
    """Fetch url into dest with pooch: cached (an existing, verified dest is reused), checked against known_hash
    ("sha256:..." / "md5:..."; None: the dataset publishes none), resumed from dest.part after an interruption."""
    import pooch
    import requests

    dest = Path(dest)
    if dest.is_file():
        return dest  # pooch verified it when it arrived
    require_network(url, what, alternative)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        pooch.retrieve(url, known_hash, fname=dest.name, path=dest.parent,
                       downloader=ResumableDownloader(part, dest.name))
    except ValueError as exc:  # pooch: the checksum does not match (the bad file is deleted)
        raise UserError(f"the download of {what} from {url} does not match its published checksum; it was "
                        f"deleted, run again to fetch it anew ({' '.join(str(exc).split())[:200]}). "
                        f"{alternative}") from None
    except (requests.RequestException, OSError) as exc:
        if diskio.is_disk_error(exc):  # a partial download would only hold on to the space it needs
            diskio.remove(part)
            raise diskio.DiskError(diskio.describe(dest, f"the download of {what}", exc) + "; the partial download "
                                   "was removed") from None
        resumable = " (run again to resume it)" if part.is_file() else ""
        raise UserError(f"downloading {what} from {url} failed ({type(exc).__name__}: {str(exc)[:160]})"
                        f"{resumable}. {alternative}") from None
    return dest


def local_or_download(path: str | None, url: str, cache: Path, what: str, expected: str, alternative: str,
                      want_file: bool = True, known_hash: str | None = None) -> Path:
    """The user's local copy (domain.path) when given, else the cached download."""
    if path:
        local = Path(os.path.expanduser(path))
        if not (local.is_file() if want_file else local.exists()):
            raise UserError(f"domain.path={path!r} is not {'a file' if want_file else 'there'} (expected {expected})")
        return local
    return download(url, cache, what, alternative, known_hash)
