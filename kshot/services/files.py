"""Files that appear whole or not at all, and locks between processes.

Every file kshot writes (caches, checkpoints, metrics, plots, predictions) goes through
:func:`atomic_path`: written beside its target, then renamed over it, so a crash or two
processes racing never leave a half-written file behind. The temporary file's name records its
writer (``.<target>.<host>-<pid>.<random>.tmp``), so that the next write of the same target
removes the temporaries of writers that were killed, and only theirs.

:func:`file_lock` lets one process build a cache while the others wait for it. It is a POSIX
record lock (``fcntl.lockf``), which the kernel releases when its process ends, however it ends,
and which child processes do not inherit: a decoder worker can never keep a cache locked after
its parent is killed. The lock file records its holder (process id, command, since when), so a
waiter says once whom it waits for; it is removed when the lock is released.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

from kshot.errors import KshotError, WaitingWarning

#: Temporaries without a writer in their name (written by kshot before 0.1.1) older than this are
#: removed: no single write takes a day.
UNTAGGED_STALE_SECONDS = 24 * 3600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- processes
def host_tag() -> str:
    """A short tag of this machine's name: process ids mean something only on their own host."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where the system says (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        boot = _boot_time()
        return None if boot is None else boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, started_by: float | None = None) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie does not). With ``started_by`` (a
    time), a process with that id that started later is another one, the id having been reused."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        pass
    if started_by is not None:
        started = process_start_time(pid)
        if started is not None and started > started_by + 2.0:
            return False
    return True


# ----------------------------------------------------------------------------- atomic writes
def _writer_tag() -> str:
    return f"{host_tag()}-{os.getpid()}"


_TAGGED = re.compile(r"^([0-9a-f]{6})-(\d+)\.[A-Za-z0-9_]+\.tmp$")  # <host>-<pid>.<random>.tmp
_UNTAGGED = re.compile(r"^[A-Za-z0-9_]{8}\.tmp$")  # mkstemp's <random>.tmp, as older kshot wrote


def _is_stale(path: Path, rest: str) -> bool:
    """Whether the temporary ``path`` (``rest``: its name after ``.<target>.``) was left by a
    writer that is gone."""
    tagged, untagged = _TAGGED.match(rest), _UNTAGGED.match(rest)
    if not (tagged or untagged):
        return False  # not one of ours (or another target's whose name starts like this one)
    try:
        mtime = path.lstat().st_mtime
    except FileNotFoundError:
        return False
    if tagged:
        return tagged.group(1) == host_tag() and not process_alive(int(tagged.group(2)), started_by=mtime)
    return time.time() - mtime > UNTAGGED_STALE_SECONDS


def remove_stale_temporaries(directory: str | os.PathLike, target_name: str) -> list[Path]:
    """Remove the temporaries of ``target_name`` in ``directory`` whose writers have died.

    Returns the paths removed. Temporaries of live writers, or of writers on other machines
    sharing the folder, are left alone."""
    directory, prefix = Path(directory), f".{target_name}."
    removed = []
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if _is_stale(path, entry.name[len(prefix):]):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    return removed


def temporary_dir(target: str | os.PathLike) -> Path:
    """A new directory beside ``target`` for building it (renamed over it when complete), named
    like :func:`atomic_path`'s temporaries, so that a killed builder's leftovers are removed too."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{_writer_tag()}.", suffix=".tmp", dir=target.parent))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_writer_tag()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def check_writable(target: str | os.PathLike, what: str, error: type[KshotError], hint: str = "") -> Path:
    """Make sure ``target`` (a file to be written later) can be written, before long work starts.

    Creates its folder if needed and writes and removes a temporary file there, leaving nothing
    else behind; any failure is ``error`` with one line naming ``what`` and the reason (read-only,
    no space, a file where a folder should be)."""
    target = Path(target)
    try:
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder")
        probe = target.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe} is a file, not a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_writer_tag()}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise error(f"cannot write {what} {target} ({e.strerror or e}){'; ' + hint if hint else ''}") from None
    return target


# ----------------------------------------------------------------------------- locks
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(key: str) -> threading.Lock:
    # POSIX record locks belong to a process, so its threads are kept apart here.
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.Lock())


def _holder_record() -> bytes:
    argv = getattr(sys, "orig_argv", None) or sys.argv
    command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv))[:120]
    return json.dumps({"pid": os.getpid(), "host": host_tag(), "hostname": socket.gethostname(),
                       "since": time.time(), "command": command}).encode()


def read_lock_holder(fd_or_path: int | str | os.PathLike) -> dict | None:
    """What a lock file says about its holder (``pid``, ``host``, ``since``, ``command``), or None."""
    try:
        if isinstance(fd_or_path, int):
            data = os.pread(fd_or_path, 4096, 0)
        else:
            with open(fd_or_path, "rb") as f:
                data = f.read(4096)
        record = json.loads(data.decode())
        return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _describe_holder(holder: dict | None, path: Path) -> tuple[str, str]:
    """(who holds the lock, since when), in words."""
    if holder is None:
        return "a process that did not record itself", "a while"
    since = float(holder.get("since") or 0)
    age = max(0.0, time.time() - since)
    when = f"{time.strftime('%H:%M:%S', time.localtime(since))} ({age:.0f} s ago)"
    who = f"process {holder['pid']}" + (f" ({holder['command']})" if holder.get("command") else "")
    if holder.get("host") != host_tag():
        who += f" on {holder.get('hostname') or 'another machine'}"
    elif not process_alive(holder["pid"], started_by=since):
        who += " (which has ended; another process that shares the folder holds the lock now)"
    return who, when


def make_dirs(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return those created, deepest first."""
    created = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    directory.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty_dirs(created: list[Path]) -> None:
    """Remove the folders in ``created`` (deepest first) that are still empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str | None = None, poll: float = 0.2) -> Iterator[None]:
    """An inter-process lock, so that two processes build one cache only once.

    Waiting for another process says so once, as a :class:`~kshot.errors.WaitingWarning` naming
    the holder and since when it holds the lock; the lock passes on as soon as the holder ends
    (finishes, fails or is killed). The lock file is removed on release, and so is its folder if
    this call created it and it is still empty.

    Args:
        path: the lock file.
        what: what the lock protects, in words (for the waiting message).
        poll: seconds between attempts while waiting.
    """
    path = Path(path)
    with _process_lock(os.path.abspath(path)):
        created = make_dirs(path.parent)
        fd = _acquire(path, what or str(path.with_suffix("")), poll)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while holding it: a waiter that gets the old file sees it is gone
            os.close(fd)  # releases the lock
            remove_empty_dirs(created)


def _acquire(path: Path, what: str, poll: float) -> int:
    said, first_wait = False, None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileNotFoundError:  # a releaser removed the folder it had created
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = read_lock_holder(fd)
            os.close(fd)
            first_wait = first_wait or time.monotonic()
            if not said and (holder is not None or time.monotonic() - first_wait > 2.0):
                who, when = _describe_holder(holder, path)
                warnings.warn(f"waiting for {who} to finish {what}: it has held the lock {path} since "
                              f"{when}; this process goes on as soon as that one ends",
                              WaitingWarning, stacklevel=4)
                said = True
            time.sleep(poll)
            continue
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if not same:  # released and removed while we waited: take the current file
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(), 0)
        return fd
