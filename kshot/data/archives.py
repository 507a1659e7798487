"""Where archives and caches live, and how they get there safely.

Two directories, kept apart on purpose:

* the **data directory** holds released archives exactly as published. It may be read-only
  (a shared mount). Looked up as ``data_dir`` argument, else ``$KSHOT_DATA_DIR``, else
  ``<user cache>/kshot/data``.
* the **cache directory** holds what kshot derives from them (decoded arrays). It must be
  writable. Looked up as ``cache_dir`` argument, else ``$KSHOT_CACHE_DIR``, else
  ``<user cache>/kshot``.

An archive missing from the data directory is downloaded from its official source with a
progress bar, checked against the published checksum, and only then moved into place. Every
file kshot writes appears atomically (written beside its target, then renamed), so a crash or
two processes racing never leave a half-written file behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kshot.errors import DataError
from kshot.services.files import atomic_path

DATA_ENV = "KSHOT_DATA_DIR"
CACHE_ENV = "KSHOT_CACHE_DIR"
#: Set to 1 to forbid downloads (tests and air-gapped machines): a missing archive is an error.
OFFLINE_ENV = "KSHOT_OFFLINE"


def user_cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "kshot"


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The directory archives are read from (and downloaded to when missing)."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return user_cache_root() / "data"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The writable directory for derived caches; created on first use."""
    if path is not None:
        root = Path(path).expanduser()
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        root = user_cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache directory {root} ({e.strerror}); "
                        f"pass --cache-dir or set {CACHE_ENV} to a writable directory") from None
    if not os.access(root, os.W_OK):
        raise DataError(f"the cache directory {root} is not writable; "
                        f"pass --cache-dir or set {CACHE_ENV} to a writable directory")
    return root


@dataclass(frozen=True)
class RemoteFile:
    """An archive as its publisher released it: file name, address, published checksum."""

    name: str
    url: str
    md5: str | None = None
    sha256: str | None = None


# ----------------------------------------------------------------------------- checks
def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<?xml", b"<!--")


def check_not_html(path: Path) -> None:
    """A quota page or login wall saved in place of an archive is the classic broken download."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if any(head.startswith(m) for m in _HTML_MARKERS):
        raise DataError(f"{path} is an HTML/XML page, not an archive (a failed download?); "
                        f"delete it and download the archive again")


def open_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip archive, turning every way it can be broken into one clear DataError."""
    if not path.is_file():
        raise DataError(f"archive {path} not found")
    check_not_html(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a valid zip archive (truncated or corrupt download?); "
                        f"delete it and download it again") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return zf


def verify_checksum(path: Path, remote: RemoteFile) -> None:
    if remote.sha256:
        algorithm, expected = "sha256", remote.sha256
    elif remote.md5:
        algorithm, expected = "md5", remote.md5
    else:
        return
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(f"checksum mismatch for {remote.name}: {algorithm} {actual}, "
                        f"expected {expected} (corrupt or tampered download); it was not kept")


# ----------------------------------------------------------------------------- download
def download(remote: RemoteFile, target: Path, progress: bool = True,
             opener: Callable[[str], object] | None = None) -> Path:
    """Download ``remote`` to ``target``, check its published checksum, then move it into place.

    Nothing appears at ``target`` unless the whole file arrived and its checksum matched.
    """
    from tqdm.auto import tqdm

    opener = opener or (lambda url: urllib.request.urlopen(url, timeout=60))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {target.parent} to download {remote.name} into "
                        f"({e.strerror}); pass --data-dir or set {DATA_ENV}") from None
    with atomic_path(target) as tmp:
        try:
            with opener(remote.url) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {remote.name}",
                          disable=not progress, leave=False) as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        bar.update(len(block))
        except OSError as e:  # URLError and HTTPError are OSErrors
            raise DataError(f"could not download {remote.name} from {remote.url} ({e}); "
                            f"download it by hand into {target.parent}") from None
        check_not_html(tmp)
        verify_checksum(tmp, remote)
    return target


def find_archive(remote: RemoteFile, dataset: str, root: str | os.PathLike | None = None,
                 download_missing: bool = True, progress: bool = True) -> Path:
    """Locate ``remote`` in the data directory (``<root>/<dataset>/`` or ``<root>/``), else fetch it."""
    base = data_dir(root)
    for candidate in (base / dataset / remote.name, base / remote.name):
        if candidate.is_file():
            return candidate
    if not download_missing or os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise DataError(f"{remote.name} not found in {base / dataset} or {base}; "
                        f"put it there, or pass --data-dir / set {DATA_ENV} to where it is")
    return download(remote, base / dataset / remote.name, progress=progress)


# ----------------------------------------------------------------------------- extraction
def _safe_member_path(dest: Path, name: str) -> Path:
    """Resolve an archive member under ``dest``; refuse absolute paths and ``..`` escapes."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"archive member {name!r} has an absolute path; refusing to extract")
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        raise DataError(f"archive member {name!r} points outside the extraction directory; "
                        f"refusing to extract")
    return target


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a zip or tar archive into ``dest``, never writing outside it.

    Links, device files and members whose names escape ``dest`` are refused. The extraction
    happens in a temporary directory beside ``dest`` and is renamed into place when complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent)).resolve()
    try:
        if zipfile.is_zipfile(archive):
            with open_zip(archive) as zf:
                for info in zf.infolist():
                    target = _safe_member_path(work, info.filename)
                    mode = (info.external_attr >> 16) & 0o170000
                    if mode == 0o120000:
                        raise DataError(f"archive member {info.filename!r} is a symbolic link; "
                                        f"refusing to extract")
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        else:
            check_not_html(archive)
            try:
                tf = tarfile.open(archive)
            except tarfile.TarError:
                raise DataError(f"{archive} is neither a zip nor a tar archive (corrupt?)") from None
            with tf:
                for member in tf.getmembers():
                    target = _safe_member_path(work, member.name)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    elif member.isfile():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        src = tf.extractfile(member)
                        with src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out)
                    else:
                        raise DataError(f"archive member {member.name!r} is a link or special "
                                        f"file; refusing to extract")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(work, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DataError(f"{archive} is truncated or corrupt ({e}); download it again") from None
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return dest
