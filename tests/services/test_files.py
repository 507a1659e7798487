"""Faults survived: killed cache builders and writers, locks kept by leftover processes.

Each test kills a real process with SIGKILL part way (a subprocess, so that the test process
itself survives) and then checks what the next run finds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kshot.errors import WaitingWarning
from kshot.services.files import atomic_write_text, file_lock

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _python(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _acquire_in_thread(path: Path, timeout: float) -> bool:
    """Take and release the lock in a thread; whether that happened within ``timeout``."""
    done = threading.Event()

    def take():
        with file_lock(path):
            pass
        done.set()

    threading.Thread(target=take, daemon=True).start()
    return done.wait(timeout)


def test_a_lock_passes_on_when_its_holder_is_killed_though_its_child_lives_on(tmp_path):
    """The defect: decoder workers inherited the cache lock and kept it after their parent was
    killed, so every later run waited forever, silently."""
    lock = tmp_path / "cache" / "thing.lock"
    holder = _python(
        "import os, sys, time\n"
        "from kshot.services.files import file_lock\n"
        "with file_lock(sys.argv[1]):\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        time.sleep(120); os._exit(0)\n"
        "    print(child, flush=True)\n"
        "    time.sleep(120)\n", str(lock))
    child = int(holder.stdout.readline())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not _acquire_in_thread(lock, timeout=1.5)  # held: the waiter waits...
            said = [str(w.message) for w in caught if issubclass(w.category, WaitingWarning)]
            assert len(said) == 1, said  # ...and says so once, naming the holder and since when
            assert f"process {holder.pid}" in said[0] and "since" in said[0]
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            assert _alive(child)  # the child that inherited the open lock file lives on
            assert _acquire_in_thread(lock, timeout=10)
        assert not lock.exists()  # released: no lock file left
    finally:
        _kill(child)
        _kill(holder.pid)
        holder.wait()
        holder.stdout.close()


def _png_folder(root: Path, data_dir: Path, n_classes: int) -> Path:
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))[:20 * n_classes]
        for name in names:
            _, alphabet, character, file = name.split("/")
            folder = root / f"{alphabet}-{character}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / file).write_bytes(archive.read(name))
    return root


def test_a_cache_build_killed_part_way_leaves_no_worker_and_the_next_build_equals_a_clean_one(
        tmp_path, data_dir):
    from kshot.data.folders import ImageFolder

    root = _png_folder(tmp_path / "pngs", data_dir, n_classes=90)  # 1,800 images: decoded by a pool
    cache = tmp_path / "cache"
    builder = _python("import sys\nfrom kshot.data.folders import ImageFolder\n"
                      "ImageFolder(sys.argv[1], cache_dir=sys.argv[2], progress=False)\n", str(root), str(cache))
    workers: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and builder.poll() is None:
        workers = _children(builder.pid)
        if len(workers) >= 2:
            break
        time.sleep(0.01)
    try:
        assert len(workers) >= 2, "the build finished before its decoder pool could be seen"
        builder.send_signal(signal.SIGKILL)
        builder.wait()
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "decoder workers outlived their killed parent"

        rebuilt: list = []
        thread = threading.Thread(target=lambda: rebuilt.append(ImageFolder(root, cache_dir=cache, progress=False)),
                                  daemon=True)
        thread.start()
        thread.join(120)
        assert rebuilt, "the next build of the same cache did not finish"
        clean = ImageFolder(root, cache_dir=tmp_path / "clean-cache", progress=False)
        assert rebuilt[0].files == clean.files
        np.testing.assert_array_equal(np.asarray(rebuilt[0]._images), np.asarray(clean._images))
        leftovers = [p.name for p in (cache / "folders").iterdir() if p.suffix not in (".npy", ".json")]
        assert leftovers == []  # no lock file, no temporary of the killed build
    finally:
        for pid in [builder.pid, *workers]:
            _kill(pid)
        builder.wait()
        builder.stdout.close()


def test_the_next_write_removes_the_temporaries_of_killed_writers_only(tmp_path):
    target = tmp_path / "run" / "last.safetensors"
    script = ("import sys, time\nfrom kshot.services.files import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    tmp.write_bytes(b'half'); print(tmp, flush=True); time.sleep(120)\n")
    killed, alive = _python(script, str(target)), _python(script, str(target))
    try:
        killed_tmp, alive_tmp = Path(killed.stdout.readline().strip()), Path(alive.stdout.readline().strip())
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        old_untagged = target.parent / ".last.safetensors.x1y2z3ab.tmp"  # an older kshot's, two days old
        old_untagged.write_bytes(b"half")
        os.utime(old_untagged, (time.time() - 2 * 86400,) * 2)
        new_untagged = target.parent / ".last.safetensors.q9w8e7rt.tmp"
        new_untagged.write_bytes(b"half")
        other = target.parent / ".metrics.jsonl.abcdef-1.x.tmp"  # another target's: not this write's business
        other.write_bytes(b"")
        assert killed_tmp.exists() and alive_tmp.exists()

        atomic_write_text(target, "whole")
        assert target.read_text() == "whole"
        assert not killed_tmp.exists() and not old_untagged.exists()
        assert alive_tmp.exists() and new_untagged.exists() and other.exists()
    finally:
        for writer in (killed, alive):
            _kill(writer.pid)
            writer.wait()
            writer.stdout.close()
