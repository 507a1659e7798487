"""Archive handling: broken downloads are recognised, checksums enforced, nothing escapes the cache."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from kshot.data.archives import RemoteFile, download, find_archive, open_zip, safe_extract
from kshot.services.files import atomic_path
from kshot.errors import DataError


class _Response(io.BytesIO):
    """A stand-in for urlopen's response, serving local bytes (tests never use the network)."""

    def __init__(self, data: bytes, truncate_to: int | None = None):
        super().__init__(data[:truncate_to] if truncate_to is not None else data)
        self.headers = {"Content-Length": str(len(data))}


def _opener(data: bytes, truncate_to: int | None = None):
    return lambda url: _Response(data, truncate_to)


def test_html_page_in_place_of_archive_is_named_as_such(tmp_path):
    page = tmp_path / "images_background.zip"
    page.write_text("<!DOCTYPE html><html><body>Google Drive - quota exceeded</body></html>")
    with pytest.raises(DataError, match="HTML"):
        open_zip(page)


def test_truncated_archive_is_named_as_such(tmp_path, data_dir):
    data = (data_dir / "omniglot" / "images_background_small1.zip").read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a valid zip"):
        open_zip(cut)


def test_download_keeps_a_file_only_when_the_checksum_matches(tmp_path, data_dir):
    data = (data_dir / "omniglot" / "images_background_small1.zip").read_bytes()
    good = RemoteFile("small1.zip", "https://example.invalid/small1.zip", md5=hashlib.md5(data).hexdigest())
    target = tmp_path / "dl" / "small1.zip"
    download(good, target, progress=False, opener=_opener(data))
    assert target.read_bytes() == data

    bad = RemoteFile("other.zip", "https://example.invalid/other.zip", md5="0" * 32)
    target2 = tmp_path / "dl" / "other.zip"
    with pytest.raises(DataError, match="checksum mismatch"):
        download(bad, target2, progress=False, opener=_opener(data))
    assert not target2.exists()
    assert sorted(p.name for p in target2.parent.iterdir()) == ["small1.zip"]  # no temp files left


def test_truncated_download_fails_the_checksum_and_leaves_nothing(tmp_path, data_dir):
    data = (data_dir / "omniglot" / "images_background_small1.zip").read_bytes()
    remote = RemoteFile("small1.zip", "https://example.invalid/small1.zip", md5=hashlib.md5(data).hexdigest())
    target = tmp_path / "small1.zip"
    with pytest.raises(DataError, match="checksum mismatch"):
        download(remote, target, progress=False, opener=_opener(data, truncate_to=1000))
    assert list(tmp_path.iterdir()) == []


def test_html_download_is_refused(tmp_path):
    page = b"<html><head><title>Sign in</title></head></html>"
    remote = RemoteFile("x.zip", "https://example.invalid/x.zip", md5=hashlib.md5(page).hexdigest())
    with pytest.raises(DataError, match="HTML"):
        download(remote, tmp_path / "x.zip", progress=False, opener=_opener(page))
    assert list(tmp_path.iterdir()) == []


def test_offline_mode_reports_a_missing_archive_instead_of_downloading(tmp_path):
    remote = RemoteFile("images_background.zip", "https://example.invalid/images_background.zip", md5="0" * 32)
    with pytest.raises(DataError, match="not found"):
        find_archive(remote, "omniglot", root=tmp_path)


def test_find_archive_looks_in_the_dataset_subfolder_and_the_root(tmp_path, data_dir):
    remote = RemoteFile("images_background_small1.zip", "https://example.invalid/x")
    assert find_archive(remote, "omniglot", root=data_dir) == data_dir / "omniglot" / remote.name
    flat = tmp_path / remote.name
    flat.write_bytes(b"PK")
    assert find_archive(remote, "omniglot", root=tmp_path) == flat


def _zip_with(path: Path, name: str, data: bytes = b"x", symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (0o120777 << 16)
        zf.writestr(info, data)
    return path


@pytest.mark.parametrize("name", ["../escape.txt", "/abs/escape.txt", "a/../../escape.txt"])
def test_zip_members_are_never_trusted_as_paths(tmp_path, name):
    archive = _zip_with(tmp_path / "evil.zip", name)
    dest = tmp_path / "cache" / "out"
    with pytest.raises(DataError, match="refusing to extract"):
        safe_extract(archive, dest)
    assert not (tmp_path / "escape.txt").exists() and not Path("/abs/escape.txt").exists()
    assert not dest.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no half-extracted directory


def test_zip_symlink_members_are_refused(tmp_path):
    archive = _zip_with(tmp_path / "link.zip", "link", data=b"/etc/passwd", symlink=True)
    with pytest.raises(DataError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out")


def test_tar_links_and_escapes_are_refused(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("ok/../../escape.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match="outside"):
        safe_extract(archive, tmp_path / "out")
    archive2 = tmp_path / "link.tar"
    with tarfile.open(archive2, "w") as tf:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DataError, match="link"):
        safe_extract(archive2, tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()


def test_safe_extract_extracts_a_real_archive(tmp_path, data_dir):
    out = safe_extract(data_dir / "omniglot" / "images_background_small1.zip", tmp_path / "small1")
    pngs = list(out.rglob("*.png"))
    assert len(pngs) == 2720


def test_atomic_path_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


# ----------------------------------------------------------------------------- zip bombs
def _zeros_member(out: zipfile.ZipFile, name: str, megabytes: int) -> None:
    """A member of ``megabytes`` MiB of zeros, deflated (about 1,000x smaller in the archive)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with out.open(info, "w", force_zip64=True) as member:
        block = bytes(1 << 20)
        for _ in range(megabytes):
            member.write(block)


def test_a_zip_bomb_among_the_omniglot_drawings_is_refused_before_it_is_read(tmp_path, data_dir):
    """The defect: a member was read whole into memory (1 MB inflating to 1 GiB took 2.3 GB)."""
    import tracemalloc

    from kshot.data.omniglot import build_cache

    data = tmp_path / "data" / "omniglot"
    data.mkdir(parents=True)
    os.symlink(data_dir / "omniglot" / "images_evaluation.zip", data / "images_evaluation.zip")
    with zipfile.ZipFile(data_dir / "omniglot" / "images_background.zip") as src, \
            zipfile.ZipFile(data / "images_background.zip", "w", zipfile.ZIP_STORED) as out:
        bomb = min(n for n in src.namelist() if n.endswith(".png"))  # the first drawing decoded
        for info in src.infolist():
            if info.filename == bomb:
                _zeros_member(out, bomb, megabytes=64)
            else:
                out.writestr(info.filename, src.read(info))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=f"{bomb}.*declares 67,108,864 bytes"):
            build_cache(tmp_path / "data", tmp_path / "cache", workers=1, download=False, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated"
    assert list((tmp_path / "cache").rglob("*")) == []  # no lock, no temporary, no empty folder left


def test_read_member_stops_at_its_cap(tmp_path):
    from kshot.data.archives import read_member

    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as out:
        _zeros_member(out, "big.bin", megabytes=3)
        out.writestr("small.txt", b"fine")
    with zipfile.ZipFile(path) as zf:
        assert read_member(zf, "small.txt", limit=10) == b"fine"
        with pytest.raises(DataError, match="big.bin.*declares 3,145,728 bytes"):
            read_member(zf, "big.bin", limit=1 << 20)


def test_extraction_refuses_an_archive_declaring_more_than_allowed_before_writing_anything(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("readme.txt", b"hello")
        _zeros_member(out, "zeros.bin", megabytes=8)
    with pytest.raises(DataError, match="declares"):
        safe_extract(archive, tmp_path / "out", max_bytes=4 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip"]  # no output, no temporary folder
    assert (safe_extract(archive, tmp_path / "out", max_bytes=16 << 20) / "readme.txt").read_bytes() == b"hello"


# ----------------------------------------------------------------------------- the newcomer's download
def test_a_failed_download_names_the_data_dir_options_and_leaves_no_folder(tmp_path):
    import urllib.error

    def unreachable(url):
        raise urllib.error.URLError("Temporary failure in name resolution")

    remote = RemoteFile("images_background.zip", "https://example.invalid/images_background.zip", md5="0" * 32)
    target = tmp_path / "home" / ".cache" / "kshot" / "data" / "omniglot" / remote.name
    with pytest.raises(DataError) as error:
        download(remote, target, progress=False, opener=unreachable)
    message = str(error.value)
    assert "--data-dir" in message and "KSHOT_DATA_DIR" in message and "name resolution" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # the folders made for the download are gone again


def test_an_unwritable_data_dir_downloads_into_the_default_one_and_finds_it_there(tmp_path, monkeypatch, data_dir):
    import urllib.request

    from kshot.data import archives
    from kshot.errors import DataWarning

    data = (data_dir / "omniglot" / "images_background_small1.zip").read_bytes()
    remote = RemoteFile("small1.zip", "https://example.invalid/small1.zip", md5=hashlib.md5(data).hexdigest())
    (tmp_path / "not-a-folder").write_text("")
    shared = tmp_path / "not-a-folder" / "data"  # cannot be created: its parent is a file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("KSHOT_OFFLINE")
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(data))
    with pytest.warns(DataWarning, match="cannot be written"):
        got = find_archive(remote, "omniglot", root=shared, progress=False)
    assert got == tmp_path / "xdg" / "kshot" / "data" / "omniglot" / "small1.zip" and got.read_bytes() == data
    monkeypatch.setenv("KSHOT_OFFLINE", "1")
    assert archives.find_archive(remote, "omniglot", root=shared) == got  # found there next time


def test_a_first_run_that_cannot_download_leaves_no_folder_and_no_lock(tmp_path, monkeypatch):
    """The newcomer's first command on a machine without the archives and without a network."""
    import urllib.error
    import urllib.request

    from kshot.data import load_dataset

    def unreachable(url, timeout=None):
        raise urllib.error.URLError("Network is unreachable")

    for name in ("KSHOT_DATA_DIR", "KSHOT_CACHE_DIR", "KSHOT_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(DataError, match=r"could not download images_background.zip .*Network is unreachable.*"
                                        r"--data-dir / KSHOT_DATA_DIR"):
        load_dataset("omniglot", "train")
    assert list(tmp_path.iterdir()) == []  # no cache folder, no data folder, no lock file
