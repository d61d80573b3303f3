"""A COW file's crash semantics are a real file's: a child process writing it is killed
with SIGKILL; what it had fsync'ed reads back, the map stays valid, no page is garbage."""

import os
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cowops import PAGE, ops
from nixfs.cow import cowmap
from nixfs.cow.bases import base_opener
from nixfs.cow.cowfile import CowFile

CHILD = Path(__file__).with_name("cowops.py")
COUNT = 400


def _states(base: bytes, seed: int):
    """The plain file's content after every op, and the op index of every fsync."""
    ref = bytearray(base)
    contents, fsyncs = [bytes(ref)], []
    for index, (op, args) in enumerate(ops(seed, len(base), COUNT)):
        if op == "write":
            off, data = args
            if off > len(ref):
                ref.extend(bytes(off - len(ref)))
            ref[off:off + len(data)] = data
        elif op == "truncate":
            del ref[args[0]:]
            ref.extend(bytes(args[0] - len(ref)))
        elif op == "fsync":
            fsyncs.append(index + 1)
        contents.append(bytes(ref))
    return contents, fsyncs


def _kill_after(directory: Path, seed: int, base_size: int, synced: int | None) -> int:
    """Run the child; SIGKILL it once it reports *synced* fsyncs (None: once it has done
    everything, unsynced writes included).  The fsyncs it reported."""
    child = subprocess.Popen([sys.executable, str(CHILD), str(directory), str(seed),
                              str(base_size), str(COUNT)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    seen = 0
    try:
        for line in child.stdout:
            if line.startswith("synced"):
                seen = int(line.split()[1])
            if (synced is not None and seen >= synced) or line.strip() == "done":
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stdin.close()
    assert child.returncode == -signal.SIGKILL
    return seen


def _check_recovered(directory: Path, base: bytes, seed: int, seen: int) -> None:
    contents, fsyncs = _states(base, seed)
    with CowFile.open(directory / "f", directory / cowmap.map_name("f"),
                      base_opener(directory)) as cow:
        size = cow.size()
        data = cow.pread(size + PAGE, 0)
    # The map on disk is one that an fsync wrote: the reported one, or a later one.
    candidates = [i for i in fsyncs[seen - 1:] if len(contents[i]) == size] if seen else \
        [i for i in [0] + fsyncs if len(contents[i]) == size]
    assert candidates, f"size {size} is no fsync'ed state's (seen {seen})"
    # Each byte is what that fsync left or what a later write made of it: never garbage.
    # (Per byte: unsynced writes may survive in part, as on a real file after a crash.)
    later = contents[min(candidates):]
    for page in range(0, size, PAGE):
        got = data[page:page + PAGE]
        if any(got == c[page:page + PAGE] for c in later):
            continue
        for x in range(page, min(page + PAGE, size)):
            seen_values = {c[x] for c in later if x < len(c)}
            assert data[x] in seen_values, f"byte {x} is garbage (seen {seen})"


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_killed_after_unsynced_writes(tmp_path, seed):
    base = random.Random(seed).randbytes([5 * PAGE + 3, 0, PAGE, 11 * PAGE][seed % 4])
    (tmp_path / "base").write_bytes(base)
    CowFile.create(tmp_path / "f", tmp_path / cowmap.map_name("f"),
                   base_opener(tmp_path)("base"), base_path="base", page_size=PAGE).close()
    seen = _kill_after(tmp_path, seed, len(base), None)
    assert seen > 3
    _check_recovered(tmp_path, base, seed, seen)


@pytest.mark.parametrize("stop", [1, 5, 12])
def test_killed_while_writing(tmp_path, stop):
    """Killed right after its Nth fsync returned, while it goes on writing."""
    seed = 40 + stop
    base = random.Random(seed).randbytes(6 * PAGE + 100)
    (tmp_path / "base").write_bytes(base)
    CowFile.create(tmp_path / "f", tmp_path / cowmap.map_name("f"),
                   base_opener(tmp_path)("base"), base_path="base", page_size=PAGE).close()
    seen = _kill_after(tmp_path, seed, len(base), stop)
    assert seen >= stop
    _check_recovered(tmp_path, base, seed, seen)


def test_the_check_catches_a_lost_fsync(tmp_path):
    """The checker is not blind: a map from before the last fsync is found out."""
    seed = 7
    base = random.Random(seed).randbytes(4 * PAGE)
    (tmp_path / "base").write_bytes(base)
    map_file = tmp_path / cowmap.map_name("f")
    CowFile.create(tmp_path / "f", map_file, base_opener(tmp_path)("base"),
                   base_path="base", page_size=PAGE).close()
    first_map = map_file.read_bytes()
    seen = _kill_after(tmp_path, seed, len(base), None)
    map_file.write_bytes(first_map)
    with pytest.raises(AssertionError):
        _check_recovered(tmp_path, base, seed, seen)
    assert os.path.exists(tmp_path / "f")


def test_fsync_orders_the_delta_before_the_map(tmp_path, monkeypatch):
    """What a power loss needs (a SIGKILL cannot show it): the delta's data is synced
    before the new map is written, the map synced before its rename, the rename synced
    (its directory) before fsync returns."""
    (tmp_path / "base").write_bytes(bytes(4 * PAGE))
    cow = CowFile.create(tmp_path / "f", tmp_path / cowmap.map_name("f"),
                         base_opener(tmp_path)("base"), base_path="base", page_size=PAGE)
    delta_ino = os.stat(tmp_path / "f").st_ino
    calls = []

    def kind(fd):
        st = os.fstat(fd)
        return "delta" if st.st_ino == delta_ino else "dir" if stat.S_ISDIR(st.st_mode) else "map"
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, real=real, name=name: (
            calls.append((name, kind(fd))), real(fd))[1])
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda *a, **k: (calls.append(("rename", "map")),
                                                         real_rename(*a, **k))[1])
    cow.pwrite(b"x" * 10, PAGE + 5)
    cow.fsync()
    monkeypatch.undo()
    cow.close()
    synced = [c for c in calls if c[1] == "delta"]
    assert synced and calls.index(synced[0]) < calls.index(("fsync", "map")) \
        < calls.index(("rename", "map")) < calls.index(("fsync", "dir")), calls
