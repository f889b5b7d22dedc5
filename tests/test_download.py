"""VOC2012 download against a real HTTP server on 127.0.0.1: fetch, MD5 check, extraction."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import sys
import tarfile
import threading
import urllib.error
from pathlib import Path

import pytest
from conftest import VocFolder, voc_xml

from pipeline_lib.data import voc
from pipeline_lib.data.voc import VOC_CLASSES, DatasetError, download_voc2012, read_voc

ARCHIVE = "VOCtrainval_11-May-2012.tar"  # torchvision's file name for VOC2012 trainval


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve tmp_path/site over HTTP on 127.0.0.1; yields (site folder, base URL)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def make_archive(tmp_path, extra_member: str | None = None) -> bytes:
    """A tiny VOC2012-shaped tar: VOCdevkit/VOC2012/{Annotations,JPEGImages,ImageSets/Main}."""
    folder = VocFolder(tmp_path / "src" / "VOCdevkit" / "VOC2012")
    objects = [
        "<object><name>dog</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>40</xmax>"
        "<ymax>30</ymax></bndbox></object>"
    ]
    folder.add("2012_000001", voc_xml("2012_000001.jpg", objects=objects))
    folder.split("train", ["2012_000001"])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(tmp_path / "src" / "VOCdevkit", arcname="VOCdevkit")
        if extra_member == "link out":  # a link to a file outside the folder
            info = tarfile.TarInfo("VOCdevkit/VOC2012/passwd")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        elif extra_member:
            info = tarfile.TarInfo(extra_member)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return buffer.getvalue()


@pytest.fixture(params=["data filter", "before Python 3.11.4"])
def tarfile_of(request, monkeypatch):
    """Runs a test with tarfile's "data" filter, and as on Pythons without it (3.11.0-3.11.3)."""
    if request.param != "data filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip(f"Python {sys.version.split()[0]} has no tarfile data filter (3.11.4 on)")
    return request.param


def test_download_extract_and_read(server, tmp_path, tarfile_of):
    site, base = server
    data = make_archive(tmp_path)
    (site / ARCHIVE).write_bytes(data)
    dest = tmp_path / "data"
    dataset = download_voc2012(dest, f"{base}/{ARCHIVE}", hashlib.md5(data).hexdigest())
    assert dataset == dest / "VOCdevkit" / "VOC2012"
    rows = read_voc(dataset, {"train": "train"}, VOC_CLASSES, progress=False)
    assert [o["class_name"] for o in rows.objects] == ["dog"]
    assert not (dest / ARCHIVE).exists()  # the 2 GB archive is not kept
    # A second call finds the dataset and downloads nothing (the server no longer has it).
    (site / ARCHIVE).unlink()
    assert download_voc2012(dest, f"{base}/{ARCHIVE}", "0" * 32) == dataset


def test_checksum_mismatch_is_rejected(server, tmp_path):
    site, base = server
    (site / ARCHIVE).write_bytes(make_archive(tmp_path))
    dest = tmp_path / "data"
    with pytest.raises(DatasetError, match="failed its MD5 check"):
        download_voc2012(dest, f"{base}/{ARCHIVE}", "0" * 32)
    assert list(dest.iterdir()) == []  # neither the corrupt archive nor a partial dataset


@pytest.mark.parametrize("member", ["../escaped.txt", "link out"])
def test_unsafe_archive_member_is_refused(server, tmp_path, tarfile_of, member):
    site, base = server
    data = make_archive(tmp_path, extra_member=member)
    (site / ARCHIVE).write_bytes(data)
    with pytest.raises(DatasetError, match="cannot unpack"):
        download_voc2012(tmp_path / "data", f"{base}/{ARCHIVE}", hashlib.md5(data).hexdigest())
    assert not (tmp_path / "escaped.txt").exists()
    assert list((tmp_path / "data").iterdir()) == []  # no archive, no partial dataset


def test_offline_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DatasetError) as info:
        download_voc2012(tmp_path / "data", f"http://127.0.0.1:{port}/{ARCHIVE}", "0" * 32)
    message = str(info.value)
    assert "could not download VOC2012" in message
    assert "Without internet, download" in message and "VOCdevkit/VOC2012/Annotations" in message


def test_torchvisions_address_checksum_and_file_name_are_the_defaults(tmp_path, monkeypatch):
    """No download here: torchvision's downloader is replaced by one that records its arguments
    and fails as it does offline."""
    from torchvision.datasets import utils
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    calls = []

    def offline(url, root, filename=None, md5=None):
        calls.append((url, root, filename, md5))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(utils, "download_url", offline)
    info, dest = DATASET_YEAR_DICT["2012"], tmp_path / "data"
    with pytest.raises(DatasetError) as raised:
        download_voc2012(dest)
    assert calls == [(info["url"], str(dest), info["filename"], info["md5"])]
    assert info["filename"] == ARCHIVE
    dataset = dest / "VOCdevkit" / "VOC2012"
    assert str(raised.value) == (
        f"could not download VOC2012 from {info['url']}: <urlopen error no network>. "
        f"Without internet, download {info['url']} yourself, unpack it so that "
        f"{dataset}/Annotations exists, and run again (or point data.root at an existing "
        "VOCdevkit folder and set data.download: false)."
    )


def test_the_archive_unpacks_beside_itself_and_moves_in_whole(server, tmp_path, monkeypatch):
    """Unpacked into a hidden folder in the destination (the same file system: the move is one
    rename), next to a VOC2007 already there."""
    site, base = server
    data = make_archive(tmp_path)
    (site / ARCHIVE).write_bytes(data)
    dest = tmp_path / "data"
    (dest / "VOCdevkit" / "VOC2007" / "Annotations").mkdir(parents=True)
    moves = []
    real_replace = voc.os.replace
    monkeypatch.setattr(voc.os, "replace", lambda a, b: moves.append((a, b)) or real_replace(a, b))
    dataset = download_voc2012(dest, f"{base}/{ARCHIVE}", hashlib.md5(data).hexdigest())
    ((source, target),) = moves
    assert Path(target) == dataset and (dataset / "Annotations" / "2012_000001.xml").is_file()
    hidden = Path(source).relative_to(dest).parts
    assert hidden[0].startswith(".unpack.") and hidden[1:] == ("VOCdevkit", "VOC2012")
    assert sorted(p.name for p in dest.iterdir()) == ["VOCdevkit"]  # the hidden folder went
    assert (dest / "VOCdevkit" / "VOC2007" / "Annotations").is_dir()


def test_an_archive_without_the_dataset_is_named(server, tmp_path):
    site, base = server
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("VOCdevkit/VOC2012/README")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (site / ARCHIVE).write_bytes(buffer.getvalue())
    md5 = hashlib.md5(buffer.getvalue()).hexdigest()
    with pytest.raises(DatasetError) as raised:
        download_voc2012(tmp_path / "data", f"{base}/{ARCHIVE}", md5)
    assert str(raised.value) == f"{ARCHIVE} holds no VOCdevkit/VOC2012/Annotations"
    assert list((tmp_path / "data").iterdir()) == []
