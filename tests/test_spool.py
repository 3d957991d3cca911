"""Spool: UID grammar for names, atomic writes, free-space guard, removal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.errors import SpoolError
from node.spool import Spool, is_valid_uid


@pytest.mark.parametrize(
    "uid",
    ["0", "1.2.840.10008.1.2", "1.2.826.0.1.3680043.10.1451.0.10", "9" * 64],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "../../etc/x",
        "1.2/3",
        "1.2.3.",
        ".1.2",
        "1..2",
        "1.02.3",
        "01.2",
        "1.2.3 ",
        "1.2.3\x00",
        "1.2.a",
        "1.2.3/../../x",
        "9" * 65,
        "1.2.3\n4",
    ],
)
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)


def test_relpath_layout_and_refusal(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.relpath("1.2", "1.2.3", "1.2.3.4") == Path("1.2/1.2.3/1.2.3.4.dcm")
    for bad in (("..", "1.2", "1.3"), ("1.2", "1.2/..", "1.3"), ("1.2", "1.3", "../../etc/x")):
        with pytest.raises(SpoolError, match="not a valid DICOM UID"):
            spool.relpath(*bad)
    with pytest.raises(SpoolError, match="outside the spool"):
        spool.abspath("../escape.dcm")


def test_atomic_write_and_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    rel = spool.relpath("1.2", "1.2.3", "1.2.3.4")
    path = spool.write_atomic(rel, [b"abc", b"", b"def"])
    assert path == spool.root / rel
    assert spool.read(rel) == b"abcdef"
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    spool.write_atomic(rel, [b"second"])  # replace is atomic too
    assert spool.read(rel) == b"second"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporaries left
    assert list(spool.iter_files()) == [rel]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    rel = spool.relpath("1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(TypeError):
        spool.write_atomic(rel, [b"ok", "not bytes"])  # type: ignore[list-item]
    assert list((spool.root / rel).parent.iterdir()) == []


def test_write_error_is_a_spool_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (tmp_path / "1.2").write_bytes(b"a file where a directory must go")
    with pytest.raises(SpoolError, match="cannot write"):
        spool.write_atomic(spool.relpath("1.2", "1.2.3", "1.2.3.4"), [b"x"])


def test_free_space_guard(tmp_path: Path) -> None:
    free = {"n": 100 * 2**20}
    spool = Spool(tmp_path, min_free_bytes=64 * 2**20, free_bytes=lambda: free["n"])
    assert spool.has_room_for(30 * 2**20)
    assert not spool.has_room_for(40 * 2**20)
    free["n"] = 10 * 2**20
    assert not spool.has_room_for(1)
    real = Spool(tmp_path)  # default: shutil.disk_usage of the spool's file system
    assert real.free_bytes() > 0 and real.has_room_for(1)


def test_remove_prune_and_stale_temporaries(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    rel = spool.relpath("1.2", "1.2.3", "1.2.3.4")
    spool.write_atomic(rel, [b"12345"])
    stale = spool.root / "1.2" / "1.2.3" / ".tmp-abc"
    stale.write_bytes(b"partial")
    assert list(spool.iter_files()) == [rel]
    assert spool.remove_stale_temporaries() == 1
    assert spool.remove(rel) == 5
    assert spool.remove(rel) == 0
    spool.prune_empty_dirs(rel.parent)
    assert os.listdir(spool.root) == []
    assert spool.root.is_dir()
