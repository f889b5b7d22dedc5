"""Atomic outputs (base/files.py): a file or folder appears whole or not at all, with the usual
permissions, and a link the user placed is replaced, never followed."""

from __future__ import annotations

import json
import os

import pytest

from pipeline_lib.base.files import atomic_dir, atomic_file, write_json


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_file_replaces_the_old_one_only_when_written_whole(tmp_path):
    path = tmp_path / "deep" / "out.txt"  # missing folders are made
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and not path.exists()
        tmp.write_text("new")
    assert path.read_text() == "new" and leftovers(path.parent) == []
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "new" and leftovers(path.parent) == []


def test_files_and_folders_get_the_permissions_the_umask_gives(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inside").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640  # 0666 less the umask's 027
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750  # 0777 less 027


def test_a_folder_is_replaced_as_a_whole_or_left_as_it_was(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "stale.parquet").write_text("old")
    with atomic_dir(out) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "images.parquet").write_text("new")
    assert [p.name for p in out.iterdir()] == ["images.parquet"]  # the stale file went with it
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.parquet").write_text("half")
        raise RuntimeError("interrupted")
    assert [p.name for p in out.iterdir()] == ["images.parquet"]
    assert leftovers(tmp_path) == []


def test_a_link_in_the_way_is_replaced_and_its_target_kept(tmp_path):
    # DVC's symlink cache links outputs into the cache: writing must replace the link, not
    # write through it into the cache (or delete the cached folder).
    cached_file, cached_dir = tmp_path / "cache_file", tmp_path / "cache_dir"
    cached_file.write_text("cached")
    cached_dir.mkdir()
    (cached_dir / "kept").write_text("cached")
    (tmp_path / "f").symlink_to(cached_file)
    (tmp_path / "d").symlink_to(cached_dir, target_is_directory=True)
    with atomic_file(tmp_path / "f") as tmp:
        tmp.write_text("new")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new").write_text("new")
    assert not (tmp_path / "f").is_symlink() and (tmp_path / "f").read_text() == "new"
    assert not (tmp_path / "d").is_symlink() and [p.name for p in (tmp_path / "d").iterdir()] == [
        "new"
    ]
    assert cached_file.read_text() == "cached" and (cached_dir / "kept").read_text() == "cached"


def test_json_is_indented_utf8_with_a_final_newline(tmp_path):
    write_json(tmp_path / "m.json", {"ä": 1, "list": [1.5]})
    text = (tmp_path / "m.json").read_bytes().decode("utf-8")
    assert text == '{\n  "ä": 1,\n  "list": [\n    1.5\n  ]\n}\n'
    assert json.loads(text) == {"ä": 1, "list": [1.5]}
