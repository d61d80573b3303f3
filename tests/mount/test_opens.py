"""Opens kept by the kernel (`-o opens=kernel`): no OPEN or RELEASE reaches nixfs, reads
and writes come by inode, a lower file is copied up at its first write.  The file
semantics must not depend on who keeps opens, so most tests run with both."""

import errno
import os
import stat
import subprocess
import time

import pytest
from harness import NixfsMount
from relharness import daemon_pid, status

from nixfs.fuse import features

needs_patch = pytest.mark.skipif(not features.FEATURES.files_by_inode,
                                 reason="needs pyfuse3 built with scripts/pyfuse3/ (06-files-by-inode)")
OPENS = [pytest.param("kernel", marks=needs_patch), "nixfs"]


@pytest.fixture(params=OPENS)
def mounted(request, lower, upper, mnt):
    with NixfsMount(lower, upper, mnt, f"opens={request.param}") as m:
        assert status(mnt)["opens"] == request.param
        m.opens = request.param
        yield m


def deleted_fds(pid: int) -> int:
    """The daemon's descriptors of unlinked files (kept for files the kernel holds)."""
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(fd_dir):
        try:
            count += os.readlink(os.path.join(fd_dir, name)).endswith(" (deleted)")
        except FileNotFoundError:
            pass
    return count


def assert_no_removed_file_kept(mnt) -> None:
    pid = daemon_pid(mnt)
    for _ in range(50):  # the kernel forgets the inode soon after the last close
        if deleted_fds(pid) == 0:
            return
        time.sleep(0.1)
    assert deleted_fds(pid) == 0, "the daemon keeps a removed file open"


@needs_patch
def test_starting_a_program_makes_no_request(lower, upper, mnt):
    """The default with the patch: after the first open, starting a program from the
    mount sends nixfs no OPEN, READ or RELEASE (its pages stay in the kernel)."""
    prog = mnt / "store/aaa-pkg/bin/pkg"
    with NixfsMount(lower, upper, mnt):
        assert status(mnt)["opens"] == "kernel"
        for _ in range(2):
            assert subprocess.run([prog], capture_output=True).stdout == b"pkg\n"
        before = status(mnt)["fuse_requests"]
        for _ in range(20):
            assert subprocess.run([prog], capture_output=True).stdout == b"pkg\n"
            with open(prog, "rb") as f:
                assert f.read() == b"#!/bin/sh\necho pkg\n"
        after = status(mnt)["fuse_requests"]
    for kind in ("open", "read", "release", "flush"):
        assert after.get(kind, 0) == before.get(kind, 0), (kind, before, after)
    assert before.get("open", 0) == 1  # answered ENOSYS: the kernel keeps opens from then on


def test_a_lower_file_is_copied_up_when_written_and_every_open_sees_it(mounted, upper):
    path = mounted.mnt / "dir/file"
    reader = os.open(path, os.O_RDONLY)
    writer = os.open(path, os.O_RDWR)
    try:
        assert os.pread(writer, 100, 0) == b"content\n"
        # Kernel overlayfs copies up at the open; with opens kept by the kernel nixfs
        # copies at the first write: nothing has changed yet, so nothing is copied.
        assert (upper / "dir/file").exists() == (mounted.opens == "nixfs")
        assert os.pwrite(writer, b"C", 0) == 1
        assert (upper / "dir/file").read_bytes() == b"Content\n"
        assert os.pread(reader, 100, 0) == b"Content\n"
        os.fsync(writer)
    finally:
        os.close(reader)
        os.close(writer)
    assert path.read_bytes() == b"Content\n"


def test_opening_with_o_trunc_truncates(mounted, upper):
    path = mounted.mnt / "dir/file"
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    assert os.stat(path).st_size == 0 and path.read_bytes() == b""
    assert (upper / "dir/file").read_bytes() == b""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_APPEND)
    try:
        os.write(fd, b"one")
        os.write(fd, b"two")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"onetwo"


@pytest.mark.parametrize("where", ["upper", "lower"])
def test_an_unlinked_open_file_stays_readable_and_writable(mounted, upper, where):
    """POSIX: a file outlives its last name while open.  A lower one written after the
    unlink gets a private copy (the lower is never written); nothing is left behind."""
    path = mounted.mnt / "dir/file"
    if where == "upper":
        path.write_bytes(b"content\n")
        assert (upper / "dir/file").exists()
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists()
        assert os.pread(fd, 100, 0) == b"content\n"
        assert os.pwrite(fd, b"after unlink", 3) == 12
        assert os.pread(fd, 100, 0) == b"conafter unlink"
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_size) == (0, 15)
    finally:
        os.close(fd)
    assert_no_removed_file_kept(mounted.mnt)
    assert not (upper / "dir/file").exists()
    assert os.listdir(upper / ".nixfs/work") == []


@pytest.mark.parametrize("where", ["upper", "lower"])
def test_an_unlinked_open_file_can_be_truncated_chmodded_and_touched(mounted, lower, upper, where):
    """ftruncate, fchmod and futimens work on an open file after its unlink (SQLite's
    temporary files are unlinked at once and then truncated); a lower one is changed
    in its private copy only (the lower fixture checks that the lower is unchanged)."""
    path = mounted.mnt / "dir/file"
    if where == "upper":
        path.write_bytes(b"content\n")
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        os.ftruncate(fd, 4)
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
        st = os.fstat(fd)
        assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (4, 0o600, 2_000_000_000)
        assert os.pread(fd, 100, 0) == b"cont"
        assert os.pwrite(fd, b"ent", 4) == 3
        assert os.pread(fd, 100, 0) == b"content"
    finally:
        os.close(fd)
    assert_no_removed_file_kept(mounted.mnt)
    assert os.listdir(upper / ".nixfs/work") == []


def test_a_file_created_read_only_is_written_through_its_open(mounted, upper):
    assert (mounted.mnt / "dir/file").read_bytes() == b"content\n"  # the kernel now keeps opens
    fd = os.open(mounted.mnt / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o444)
    try:
        assert os.write(fd, b"read-only now") == 13
    finally:
        os.close(fd)
    assert (mounted.mnt / "new").read_bytes() == b"read-only now"
    assert os.stat(upper / "new").st_mode & 0o777 == 0o444
    # Its descriptor is let go (there is no RELEASE for it when the kernel keeps opens).
    os.unlink(mounted.mnt / "new")
    assert_no_removed_file_kept(mounted.mnt)


def test_writing_a_directory_or_through_a_read_only_open_fails(mounted):
    with pytest.raises(IsADirectoryError):
        os.open(mounted.mnt / "dir", os.O_WRONLY)
    fd = os.open(mounted.mnt / "dir/ro-file", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EBADF  # the kernel's: not open for writing
    finally:
        os.close(fd)


def test_a_shared_writable_mapping_of_a_lower_file_is_written_back(mounted, upper):
    """Pages written through mmap come back as WRITEs (by inode when the kernel keeps
    opens): the lower file is copied up then, and the lower is never written."""
    import mmap
    path = mounted.mnt / "dir/file"
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 8) as m:
            assert m[:8] == b"content\n"
            m[:4] = b"CONT"
            m.flush()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"CONTent\n"
    assert (upper / "dir/file").read_bytes() == b"CONTent\n"
