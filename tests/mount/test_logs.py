"""The log in the upper (``UPPER/.nixfs/nixfs.log``) is in a folder the upper's owner
controls: a symlink planted at its name must not make a root daemon, nor its database
worker, append to whatever it points at."""

import logging
import os
import signal
import time

from conftest import needs_root
from harness import force_unmount, run_nixfs
from nixstore import generate_db

from nixfs import logs

HIDDEN = "lower paths hidden through the mount left the database"


def _layers(tmp_path):
    lower = tmp_path / "L/nix"
    names = [os.path.basename(p) for p in
             generate_db(lower / "var/nix/db/db.sqlite", 5, refs=0,
                         store_dirs=lower / "store")]
    upper, mnt = tmp_path / "upper", tmp_path / "M/nix"
    upper.mkdir()
    mnt.mkdir(parents=True)
    target = tmp_path / "outside"
    target.write_text("not the log's\n")
    return lower, upper, mnt, target, names


def _mount(lower, upper, mnt):
    return run_nixfs("mount", "--lower", lower, "--upper", upper, mnt)


def _worker_pids(mnt) -> set[int]:
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"nixfs.nixdb.worker" in argv and any(os.fsencode(mnt) in a for a in argv):
            pids.add(int(pid))
    return pids


def _until(cond, what, timeout=30.0):
    """Poll *cond* (the daemon's rounds run every 0.5 s); fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while not (found := cond()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return found


def _read(path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@needs_root
def test_a_restarted_worker_never_follows_a_symlink_at_the_log(tmp_path):
    lower, upper, mnt, target, names = _layers(tmp_path)
    proc = _mount(lower, upper, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        first = _until(lambda: _worker_pids(mnt), "the database worker starting")
        log = upper / ".nixfs/nixfs.log"
        moved = upper / ".nixfs/the-daemons-log"  # the daemon keeps writing to its file
        os.rename(log, moved)
        os.symlink(target, log)
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        _until(lambda: _worker_pids(mnt) - first, "the daemon starting a new worker")
        os.rmdir(mnt / "store" / names[0])  # the new worker logs the hiding
        _until(lambda: HIDDEN in _read(moved) + _read(target), "the worker's log line")
        assert target.read_text() == "not the log's\n"
        assert HIDDEN in moved.read_text()
        assert os.path.islink(log)
        assert os.path.isdir(mnt / "store" / names[1])  # still serving
    finally:
        run_nixfs("umount", mnt, timeout=120)
        force_unmount(mnt)
    assert target.read_text() == "not the log's\n"


@needs_root
def test_a_symlink_given_as_the_log_refuses_the_mount_in_one_line(tmp_path):
    """(One at the default log's name is refused by the state folder's check.)"""
    lower, upper, mnt, target, _ = _layers(tmp_path)
    log = tmp_path / "nixfs.log"
    os.symlink(target, log)
    try:
        proc = run_nixfs("mount", "--no-nix", "--lower", lower, "--upper", upper, "--log", log,
                         mnt)
        assert (proc.returncode, proc.stderr) == (2, (
            f"nixfs: the log {log} is a symbolic link, which nixfs does not follow: give the "
            "file it points to\n"))
        assert not os.path.ismount(mnt)
    finally:
        force_unmount(mnt)
    assert target.read_text() == "not the log's\n"


def test_the_log_is_opened_only_as_a_regular_file(tmp_path):
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo"):
        try:
            logs.open_log(str(tmp_path / name)).close()
        except OSError:
            continue
        raise AssertionError(f"opened the {name}")
    assert not (tmp_path / "elsewhere").exists()
    with logs.open_log(str(tmp_path / "log")) as f:
        f.write("one\n")
    with logs.open_log(str(tmp_path / "log")) as f:
        f.write("two\n")
    assert (tmp_path / "log").read_text() == "one\ntwo\n"


def test_the_worker_appends_to_the_daemons_file_and_follows_its_rotation(tmp_path):
    path = tmp_path / "nixfs.log"
    daemon = logs.DaemonLog(str(path))
    worker = logs.WorkerLog(daemon.shared_fd(), str(path))

    def say(handler, text):
        handler.emit(logging.makeLogRecord({"msg": text}))

    os.rename(path, tmp_path / "moved")  # not a rotation: no new file at the name
    say(worker, "one")
    daemon.doRollover()  # the name holds a new file now
    say(worker, "two")
    say(daemon, "three")
    os.rename(path, tmp_path / "rotated")
    os.symlink(tmp_path / "outside", path)
    say(worker, "four")  # stays with its file
    worker.close()
    daemon.close()
    assert (tmp_path / "moved").read_text() == "one\n"
    assert (tmp_path / "rotated").read_text() == "two\nthree\nfour\n"
    assert not (tmp_path / "outside").exists()
