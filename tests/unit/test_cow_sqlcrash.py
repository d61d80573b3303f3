"""The crash loop over a COW database: a writer in another process, through the nixfs-cow
VFS, is killed with SIGKILL again and again at moments its commits pick (mid-transaction,
mid-checkpoint, mid-VACUUM); every time the database passes integrity_check, holds every
transaction it reported committed, and the next writer carries on."""

import signal
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from nixfs.cow import cowmap, vfs
from nixfs.cow.bases import base_opener
from nixfs.cow.cowfile import CowFile

WRITER = Path(__file__).with_name("cowsql.py")
KILLS = (3, 11, 24, 38, 52, 75, 99, 120)  # after how many of its commits each writer dies


def _base(root: Path) -> Path:
    conn = apsw.Connection(str(root / "base.db"))
    conn.execute("create table log (i integer primary key, v blob); create table meta (n)")
    conn.execute("insert into meta values (0)")
    conn.close()
    path = root / "db"
    CowFile.create(path, cowmap.map_path(path), base_opener(root)("base.db"),
                   base_path="base.db").close()
    return path


def _run_and_kill(path: Path, root: Path, journal: str, commits: int) -> int:
    """The last transaction the writer reported committed before it was killed."""
    writer = subprocess.Popen([sys.executable, str(WRITER), str(path), str(root), journal],
                              stdout=subprocess.PIPE, text=True)
    last, seen = 0, 0
    try:
        for line in writer.stdout:
            last, seen = int(line.split()[1]), seen + 1
            if seen >= commits:
                break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL, "the writer died on its own"
    return last


def _check(path: Path, root: Path, committed: int) -> int:
    conn = vfs.connect(path, base_root=root)
    try:
        assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]
        n = conn.execute("select n from meta").fetchall()[0][0]
        assert n >= committed, f"transaction {committed} was reported committed, the db has {n}"
        rows = conn.execute("select count(*), min(i), max(i) from log").fetchall()[0]
        assert rows == (min(n, 100), max(1, n - 99), n), (rows, n)
    finally:
        conn.close()
    return n


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_kill_the_writer_again_and_again(tmp_path, journal):
    path = _base(tmp_path)
    base_bytes = (tmp_path / "base.db").read_bytes()
    done = 0
    for commits in KILLS:
        committed = _run_and_kill(path, tmp_path, journal, commits)
        assert committed > done
        done = _check(path, tmp_path, committed)
    assert (tmp_path / "base.db").read_bytes() == base_bytes  # the base never written
