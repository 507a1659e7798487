"""Shared fixtures: the real data directory, one writable cache per session, no network.

Tests read archives from ``$KSHOT_DATA_DIR`` (CI: ``../shared/data``) and never download:
``KSHOT_OFFLINE=1`` makes a missing archive an error, and sockets are refused outright.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("KSHOT_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


DATA_DIR = _data_dir()
if not (DATA_DIR / "omniglot" / "images_background.zip").is_file():
    raise pytest.UsageError(
        f"the real data is not at {DATA_DIR}: set KSHOT_DATA_DIR to the folder holding omniglot/ "
        f"(see README.md, 'Running the tests')")

os.environ["KSHOT_DATA_DIR"] = str(DATA_DIR)
os.environ["KSHOT_OFFLINE"] = "1"
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A writable cache shared by the session (``$KSHOT_CACHE_DIR`` when CI sets one)."""
    env = os.environ.get("KSHOT_CACHE_DIR")
    path = Path(env) if env else tmp_path_factory.mktemp("kshot-cache")
    os.environ["KSHOT_CACHE_DIR"] = str(path)
    return path


_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_connect = socket.socket.connect


def _local_only(sock, address):
    """Allow Unix sockets and loopback (multiprocessing, gloo); refuse everything else."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL_HOSTS:
        raise OSError(f"tests must not use the network (tried to reach {address[0]})")
    return _connect(sock, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, cache_dir):
    monkeypatch.setattr(socket.socket, "connect", _local_only)
    monkeypatch.setenv("KSHOT_CACHE_DIR", str(cache_dir))


@pytest.fixture(scope="session")
def omniglot(cache_dir):
    """Loader of Omniglot splits from the session cache: ``omniglot("test")``."""
    from kshot.data import Omniglot

    loaded = {}

    def get(split: str = "train", protocol: str = "vinyals", **kwargs):
        key = (split, protocol, tuple(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = Omniglot(split, protocol=protocol, cache_dir=cache_dir, **kwargs)
        return loaded[key]

    return get


@pytest.fixture(scope="session")
def omniglot_pngs(data_dir):
    """Writes real Omniglot PNGs (from the official evaluation archive) into class folders.

    ``omniglot_pngs(root, characters, drawings=range(20))`` makes ``root/<Alphabet>-<charNN>/``
    holding those drawings' original files, and returns the folder names in order.
    ``characters`` are ``"Alphabet/characterNN"`` names of the evaluation archive.
    """
    import zipfile

    archive = zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip")
    members: dict[str, list[str]] = {}
    for name in archive.namelist():
        if name.endswith(".png"):
            members.setdefault(name.split("/", 1)[1].rsplit("/", 1)[0], []).append(name)

    def make(root: Path, characters, drawings=range(20)) -> list[str]:
        folders = []
        for character in characters:
            files = sorted(members[character])
            folder = Path(root) / character.replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            for i in drawings:
                (folder / files[i].rsplit("/", 1)[1]).write_bytes(archive.read(files[i]))
            folders.append(folder.name)
        return folders

    return make


@pytest.fixture(scope="session")
def omniglot_table(omniglot):
    """Writes real Omniglot drawings as a CSV table: a ``character`` label column and
    ``side x side`` average-pooled pixels ``px0..``; the first ``n_classes`` evaluation characters."""
    import csv

    def make(path: Path, n_classes: int = 30, side: int = 7) -> Path:
        data = omniglot("test", protocol="lake")
        rows = []
        for c in range(n_classes):
            x = data.load(data.class_examples()[c])
            pooled = torch.nn.functional.adaptive_avg_pool2d(x, side).flatten(1).numpy()
            rows += [[data.class_names[c], *(f"{v:.6g}" for v in r)] for r in pooled]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["character"] + [f"px{i}" for i in range(side * side)])
            writer.writerows(rows)
        return path

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir):
    """A short real ProtoNet run, shared by the training and CLI tests: Omniglot 5-way 1-shot,
    300 outer steps, tested on 600 fixed tasks."""
    from kshot.config import resolve_config
    from kshot.runs.train import train

    run_dir = tmp_path_factory.mktemp("run") / "quick"
    config = resolve_config("quick", overrides=dict(steps=300, val_every=150, val_tasks=100, test_tasks=600,
                                                    test_queries=5, cache_dir=str(cache_dir)))
    return run_dir, train(config, run_dir, progress=False)


@pytest.fixture
def one_torch_thread():
    """Use as ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with one_thread():
        yield


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: on a loaded shared machine, small models run several times
    faster so than on two threads that wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def siamese_run(tmp_path_factory, cache_dir) -> Path:
    """Run directory of a short real Siamese training run (Omniglot, Lake split, 100 steps of
    48 pairs, threshold calibrated on 1,000 pairs), shared by the Siamese and ``kshot verify`` tests."""
    import kshot.learners.siamese
    from kshot.config import resolve_config
    from kshot.runs.train import train

    config = resolve_config(overrides=dict(
        algo="siamese", protocol="lake", backbone_options={"hidden": 32}, pairs=48, steps=100,
        lr=3e-3, lr_schedule="constant", val_every=50, val_tasks=10, test_ways=5, test_queries=5,
        test_tasks=0, checkpoint_every=50, log_every=20, cache_dir=str(cache_dir)))
    run_dir = tmp_path_factory.mktemp("siamese-run")
    with one_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kshot.learners.siamese, "CALIBRATION_PAIRS", 1000)  # speed only
        train(config, run_dir, progress=False)
    return run_dir
