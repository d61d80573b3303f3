"""Hostile lower content: odd names, symlink loops, symlinks out of the layer, FIFOs
and device nodes.  Each gets a clear answer (or errno), the daemon keeps serving,
and nothing outside the layers is touched."""

import errno
import os
import stat

from conftest import needs_root
from harness import NixfsMount, snapshot
from relharness import errno_of, status

ODD = [b"new\nline", b"bad\xff\xfeutf8", b"tab\tand space ", b"L" * 255]


def _decoy(tmp_path):
    """A file and a directory outside both layers that nothing may change."""
    d = tmp_path / "decoy"
    (d / "dir/sub").mkdir(parents=True)
    (d / "secret").write_bytes(b"host file\n")
    (d / "dir/sub/f").write_bytes(b"host dir file\n")
    os.chmod(d / "secret", 0o640)
    return d


def _fingerprint(path):
    snap = snapshot(path, times_before=2**63)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            snap[os.fsencode(os.path.relpath(full, path))]["ctime"] = os.lstat(full).st_ctime_ns
    return snap


def test_odd_names_work_everywhere(tmp_path, upper, mnt):
    lower = tmp_path / "lower"
    lower.mkdir()
    for name in ODD:
        with open(os.path.join(os.fsencode(lower), name), "wb") as f:
            f.write(name)
    m, lb = os.fsencode(mnt), os.fsencode(lower)
    with NixfsMount(lower, upper, mnt, extra_args=["--no-nix"]):
        assert sorted(os.listdir(m)) == sorted(ODD)
        for name in ODD:
            path = m + b"/" + name
            assert open(path, "rb").read() == name
            with open(path, "ab") as f:  # copy-up
                f.write(b"+")
            made = m + b"/made-" + name[:240]
            with open(made, "wb") as f:
                f.write(name)
            os.rename(made, made + b".r")
            assert open(made + b".r", "rb").read() == name
        # A 255-byte lower name is hidden by a whiteout device (".wh." + 255 is too long).
        os.unlink(m + b"/" + b"L" * 255)
        assert b"L" * 255 not in os.listdir(m)
        assert errno_of(os.stat, m + b"/" + b"L" * 256) == errno.ENAMETOOLONG
        too_long = m + b"/" + b"M" * 256
        assert errno_of(os.open, too_long, os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
        os.mkdir(m + b"/" + b"D" * 255)
        assert status(mnt)["errors"] == 0
    ub = os.fsencode(upper)
    for name in ODD[:3]:
        assert open(ub + b"/" + name, "rb").read() == name + b"+"
        assert open(lb + b"/" + name, "rb").read() == name
    with NixfsMount(lower, upper, mnt, extra_args=["--no-nix"]):  # all kept across a remount
        assert b"L" * 255 not in os.listdir(m)
        assert b"D" * 255 in os.listdir(m)
        assert open(m + b"/" + ODD[1], "rb").read() == ODD[1] + b"+"


def test_symlink_loops_give_eloop(tmp_path, upper, mnt):
    lower = tmp_path / "lower"
    lower.mkdir()
    os.symlink("loop2", lower / "loop1")
    os.symlink("loop1", lower / "loop2")
    os.symlink("self", lower / "self")
    os.symlink("self/x/y", lower / "deep")
    with NixfsMount(lower, upper, mnt, extra_args=["--no-nix"]):
        for name in ("loop1", "loop2", "self", "deep"):
            assert stat.S_ISLNK(os.lstat(mnt / name).st_mode)
            assert errno_of(os.stat, mnt / name) == errno.ELOOP
            assert errno_of(open, mnt / name) == errno.ELOOP
        assert os.readlink(mnt / "loop1") == "loop2"
        os.chown(mnt / "self", 0, 0, follow_symlinks=False)  # copies the link itself up
        assert os.readlink(upper / "self") == "self"
        os.rename(mnt / "loop1", mnt / "loop3")
        assert os.readlink(mnt / "loop3") == "loop2"
        assert status(mnt)["errors"] == 0


@needs_root
def test_symlinks_out_of_the_lower_are_never_followed(tmp_path, upper, mnt):
    decoy = _decoy(tmp_path)
    lower = tmp_path / "lower"
    (lower / "dir/moved/nested").mkdir(parents=True)
    (lower / "dir/moved/nested/f").write_bytes(b"lower f\n")
    os.symlink(decoy / "secret", lower / "dir/abs")
    os.symlink("../../decoy/secret", lower / "dir/rel")  # also from mnt/dir: tmp_path/decoy
    os.symlink(decoy / "dir", lower / "dir/linkdir")
    before = _fingerprint(decoy)
    with NixfsMount(lower, upper, mnt, extra_args=["--no-nix"]):
        for name in ("abs", "rel", "linkdir"):
            p = mnt / "dir" / name
            assert stat.S_ISLNK(os.lstat(p).st_mode)
            assert os.readlink(p) == os.readlink(lower / "dir" / name)
            os.listxattr(p, follow_symlinks=False)
            assert errno_of(os.getxattr, p, "user.x", follow_symlinks=False) == errno.ENODATA
            os.utime(p, ns=(1, 1), follow_symlinks=False)  # copy-up of the link itself
            os.chown(p, 1, 1, follow_symlinks=False)
            assert os.readlink(upper / "dir" / name) == os.readlink(lower / "dir" / name)
            assert os.lstat(upper / "dir" / name).st_uid == 1
        os.unlink(mnt / "dir/abs")
        os.rename(mnt / "dir/rel", mnt / "rel2")
        # A renamed lower directory merges with its lower path through a redirect: nixfs
        # opens it one component at a time, never through a symlink.
        os.rename(mnt / "dir/moved", mnt / "moved")
        assert (mnt / "moved/nested/f").read_bytes() == b"lower f\n"
        assert status(mnt)["errors"] == 0
    # A hostile upper: redirects that point through a lower symlink, or out with "..".
    (upper / "moved/.wh..wh..nixfs-redirect").write_bytes(b"/dir/linkdir")
    (upper / "esc").mkdir()
    (upper / "esc/.wh..wh..nixfs-redirect").write_bytes(b"/../decoy/dir")
    with NixfsMount(lower, upper, mnt, extra_args=["--no-nix"]):
        for d in ("moved", "esc"):
            err = errno_of(os.listdir, mnt / d)
            assert err in (0, errno.ELOOP, errno.EINVAL, errno.ENOTDIR), err
            if err == 0:
                assert os.listdir(mnt / d) == []
            assert errno_of(os.stat, mnt / d / "sub") != 0
            assert errno_of(os.chmod, mnt / d / "sub/f", 0o777) != 0
        assert (mnt / "dir/linkdir").is_symlink()
    assert _fingerprint(decoy) == before


@needs_root
def test_fifos_and_devices_in_the_lower(tmp_path, upper, mnt):
    lower = tmp_path / "lower"
    lower.mkdir()
    os.mkfifo(lower / "fifo")
    os.mknod(lower / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(lower / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    os.mknod(lower / "zero", 0o600 | stat.S_IFCHR, 0)  # a whiteout, in overlayfs' format
    (lower / "d").mkdir()
    os.mknod(lower / "d/zero", 0o600 | stat.S_IFCHR, 0)
    with NixfsMount(lower, upper, mnt, extra_args=["--no-nix"]):
        # Whiteout devices are hidden, as kernel overlayfs hides them in any layer (shown,
        # a copy-up would have made a whiteout of the upper: the name would vanish).
        assert sorted(os.listdir(mnt)) == ["blk", "d", "fifo", "null"]
        assert errno_of(os.lstat, mnt / "zero") == errno.ENOENT
        os.rmdir(mnt / "d")  # empty, as far as the merged view goes
        (mnt / "zero").write_bytes(b"a new file\n")
        assert (mnt / "zero").read_bytes() == b"a new file\n"
        assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
        assert os.lstat(mnt / "null").st_rdev == os.makedev(1, 3)
        assert stat.S_ISBLK(os.lstat(mnt / "blk").st_mode)
        # The kernel serves FIFOs itself: opening one never waits on the daemon.
        fd = os.open(mnt / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
        for name in ("fifo", "null", "blk"):  # copy-ups make the same kind of node
            os.chown(mnt / name, 1, 1)
            st, lst = os.lstat(upper / name), os.lstat(lower / name)
            assert (stat.S_IFMT(st.st_mode), st.st_rdev, st.st_uid) == \
                (stat.S_IFMT(lst.st_mode), lst.st_rdev, 1)
        assert open(mnt / "null", "rb").read() == b""
        assert status(mnt)["errors"] == 0
