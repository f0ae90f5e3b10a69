"""Downloads with a cache, a progress bar and a fast, clear failure when offline."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from shortcut.config import UserError


def require_network(url: str, what: str, alternative: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the offline alternative, when the host of url cannot be reached."""
    host = urlparse(url).hostname or url
    try:
        socket.create_connection((host, 443 if url.startswith("https") else 80), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot download {what}: {host} is unreachable ({exc.__class__.__name__}); "
                        f"you seem to be offline. {alternative}") from None


def download(url: str, dest: Path, what: str, alternative: str) -> Path:
    """Fetch url into dest (cached: an existing dest is reused), writing to a temporary name first."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    require_network(url, what, alternative)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        tmp.rename(dest)
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"downloading {what} from {url} failed ({exc}). {alternative}") from None
    return dest


def local_or_download(path: str | None, url: str, cache: Path, what: str, expected: str, alternative: str,
                      want_file: bool = True) -> Path:
    """The user's local copy (domain.path) when given, else the cached download."""
    if path:
        local = Path(os.path.expanduser(path))
        if not (local.is_file() if want_file else local.exists()):
            raise UserError(f"domain.path={path!r} is not {'a file' if want_file else 'there'} (expected {expected})")
        return local
    return download(url, cache, what, alternative)
