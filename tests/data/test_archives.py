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
