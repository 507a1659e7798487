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
import io
import os
import shutil
import tarfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kshot.errors import DataError, DataWarning
from kshot.services.files import atomic_path, make_dirs, remove_empty_dirs, temporary_dir

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
    return default_data_dir()


def default_data_dir() -> Path:
    """Where archives go when no data directory is named: ``<user cache>/kshot/data``."""
    return user_cache_root() / "data"


def search_dirs(path: str | os.PathLike | None = None) -> list[Path]:
    """Where archives are looked for, in order: the data directory, then the default one (where
    downloads go when the data directory cannot be written)."""
    first = data_dir(path)
    return [first] if first == default_data_dir() else [first, default_data_dir()]


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The writable directory for derived caches.

    It is created by the first write into it (so a run that fails before writing anything
    leaves no empty folder behind); here it is only checked to be writable, or creatable."""
    if path is not None:
        root = Path(path).expanduser()
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        root = user_cache_root()
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        what = "is not a writable directory" if probe == root else f"cannot be created ({probe} is not writable)"
        raise DataError(f"the cache directory {root} {what}; pass --cache-dir or set {CACHE_ENV} to a "
                        f"writable directory")
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
def _point_elsewhere(what: str) -> str:
    return (f"or, if the archives are already on this machine, point --data-dir / {DATA_ENV} at the "
            f"folder that holds {what}")


def _writable_target(target: Path) -> bool:
    """Whether ``target``'s folder exists and is writable, or could be created."""
    probe = target.parent
    while not probe.exists():
        if probe == probe.parent:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def download(remote: RemoteFile, target: Path, progress: bool = True,
             opener: Callable[[str], object] | None = None) -> Path:
    """Download ``remote`` to ``target``, check its published checksum, then move it into place.

    Nothing appears at ``target`` unless the whole file arrived and its checksum matched; a
    failed download also removes the folders it created for it.
    """
    from tqdm.auto import tqdm

    opener = opener or (lambda url: urllib.request.urlopen(url, timeout=60))
    wanted = f"{target.parent.name}/{target.name}"
    try:
        created = make_dirs(target.parent)
    except OSError as e:
        raise DataError(f"cannot create {target.parent} to download {remote.name} into ({e.strerror}); "
                        f"pass --data-dir or set {DATA_ENV} to a writable folder, "
                        f"{_point_elsewhere(wanted)}") from None
    try:
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
                reason = str(getattr(e, "reason", None) or e.strerror or e)[:120]
                raise DataError(f"could not download {remote.name} from {remote.url} ({reason}); "
                                f"download it by hand into {target.parent}, {_point_elsewhere(wanted)}") from None
            check_not_html(tmp)
            verify_checksum(tmp, remote)
    except BaseException:
        remove_empty_dirs(created)
        raise
    return target


def find_archive(remote: RemoteFile, dataset: str, root: str | os.PathLike | None = None,
                 download_missing: bool = True, progress: bool = True) -> Path:
    """Locate ``remote`` in the data directory (``<root>/<dataset>/`` or ``<root>/``), else fetch it.

    The default data directory (``<user cache>/kshot/data``) is searched too, after the one
    named. A missing archive is downloaded into the data directory named, or, when that cannot be
    written (a read-only shared copy), into the default one.
    """
    bases = search_dirs(root)
    for base in bases:
        for candidate in (base / dataset / remote.name, base / remote.name):
            if candidate.is_file():
                return candidate
    looked = " or ".join(str(b / dataset) for b in bases)
    if not download_missing or os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise DataError(f"{remote.name} not found in {looked} (downloads are off: {OFFLINE_ENV}=1); "
                        f"put it in {bases[0] / dataset}, {_point_elsewhere(f'{dataset}/{remote.name}')}")
    target = bases[0] / dataset / remote.name
    if not _writable_target(target) and len(bases) > 1:
        fallback = bases[1] / dataset / remote.name
        warnings.warn(f"{bases[0]} cannot be written; downloading {remote.name} into {fallback.parent} "
                      f"instead", DataWarning, stacklevel=2)
        target = fallback
    return download(remote, target, progress=progress)


# ----------------------------------------------------------------------------- extraction
#: Extraction refuses archives that declare more than this in all (a zip bomb fills the disk).
MAX_EXTRACTED_BYTES = 64 << 30


def _too_large(name: str, size: int, limit: int, archive: Path | str) -> DataError:
    return DataError(f"archive member {name!r} of {archive} declares {size:,} bytes, more than the "
                     f"{limit:,} kshot reads for it (a zip bomb, or not the archive expected?); "
                     f"refusing to read it")


def check_declared_sizes(zf: zipfile.ZipFile, member_limit: int, total_limit: int | None = None) -> None:
    """Refuse a zip whose members declare more bytes than ``member_limit`` each (or
    ``total_limit`` together), before any of them is read."""
    total = 0
    for info in zf.infolist():
        if info.file_size > member_limit:
            raise _too_large(info.filename, info.file_size, member_limit, zf.filename or "the archive")
        total += info.file_size
    if total_limit is not None and total > total_limit:
        raise DataError(f"{zf.filename} declares {total:,} bytes in all, more than the {total_limit:,} "
                        f"kshot extracts (a zip bomb, or not the archive expected?); refusing to extract it")


def _copy_capped(src, out, limit: int, name: str, archive: Path | str) -> int:
    """Copy ``src`` to ``out`` (or into memory when ``out`` is None) up to ``limit`` bytes."""
    copied = 0
    while True:
        block = src.read(min(1 << 20, limit + 1 - copied))
        if not block:
            return copied
        copied += len(block)
        if copied > limit:
            raise _too_large(name, copied, limit, archive)
        out.write(block)


def read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """One member's bytes, refusing members that declare, or inflate to, more than ``limit``."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise _too_large(name, info.file_size, limit, zf.filename or "the archive")
    buffer = io.BytesIO()
    with zf.open(info) as src:
        _copy_capped(src, buffer, limit, name, zf.filename or "the archive")
    return buffer.getvalue()


def _safe_member_path(dest: Path, name: str) -> Path:
    """Resolve an archive member under ``dest``; refuse absolute paths and ``..`` escapes."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"archive member {name!r} has an absolute path; refusing to extract")
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        raise DataError(f"archive member {name!r} points outside the extraction directory; "
                        f"refusing to extract")
    return target


def safe_extract(archive: Path, dest: Path, max_bytes: int = MAX_EXTRACTED_BYTES) -> Path:
    """Extract a zip or tar archive into ``dest``, never writing outside it.

    Links, device files and members whose names escape ``dest`` are refused, and so are archives
    that declare more than ``max_bytes`` (checked before anything is written; each member is also
    cut off at its declared size). The extraction happens in a temporary directory beside ``dest``
    and is renamed into place when complete.
    """
    dest = Path(dest)
    work = temporary_dir(dest).resolve()
    try:
        if zipfile.is_zipfile(archive):
            with open_zip(archive) as zf:
                check_declared_sizes(zf, max_bytes, max_bytes)
                _check_space(archive, sum(i.file_size for i in zf.infolist()), dest.parent)
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
                        _copy_capped(src, out, info.file_size, info.filename, archive)
        else:
            check_not_html(archive)
            try:
                tf = tarfile.open(archive)
            except tarfile.TarError:
                raise DataError(f"{archive} is neither a zip nor a tar archive (corrupt?)") from None
            with tf:
                members = tf.getmembers()
                total = sum(m.size for m in members if m.isfile())
                if total > max_bytes:
                    raise DataError(f"{archive} declares {total:,} bytes in all, more than the {max_bytes:,} "
                                    f"kshot extracts; refusing to extract it")
                _check_space(archive, total, dest.parent)
                for member in members:
                    target = _safe_member_path(work, member.name)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    elif member.isfile():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        src = tf.extractfile(member)
                        with src, open(target, "wb") as out:
                            _copy_capped(src, out, member.size, member.name, archive)
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


def _check_space(archive: Path, needed: int, where: Path) -> None:
    free = shutil.disk_usage(where).free
    if needed > free:
        raise DataError(f"extracting {archive} needs {needed / 2**30:.1f} GiB but {where} has "
                        f"{free / 2**30:.1f} GiB free; free some space or use another --cache-dir")
