"""Callers of several uids through a root mount with ``allow_other``, as pjdfstest
calls it: only the effective ids switched, each call in a fresh process, umask 0.

What pjdfstest found: a new object must get exactly the mode the kernel asks for
(the caller's umask is already applied then; the daemon's own umask must not be),
at any name length up to NAME_MAX, also where a lower entry of that name was
whited out; and a directory made 0777 lets anyone rename in it.
"""

import os
import stat

import pytest
from conftest import needs_root
from harness import NixfsMount, as_caller

pytestmark = needs_root

NOBODY = (65534, 65534)
OTHER = (1234, 5678)  # a uid and gid that no account has
CALLERS = [(0, 0), NOBODY, OTHER]
# Up to NAME_MAX, and around where ".wh." + the name stops fitting (251 bytes).
LENGTHS = [1, 200, 251, 252, 255]


def _name(prefix: str, length: int) -> str:
    return (prefix * length)[:length]


@pytest.fixture
def shared(tmp_path):
    """A root nixfs mount for everyone, over a lower with names up to NAME_MAX in a
    0777 directory (so every caller may create and remove there)."""
    lower, upper, mnt = (tmp_path / n for n in ("lower", "upper", "mnt"))
    for path in (lower, upper, mnt):
        path.mkdir()
    (lower / "open").mkdir()
    for length in LENGTHS:
        (lower / "open" / _name("L", length)).write_bytes(b"lower\n")
    os.chmod(lower / "open", 0o777)
    with NixfsMount(lower, upper, mnt, "allow_other", extra_args=["--no-nix"]) as m:
        yield m


def _create(name: str, mode: int):
    def call():
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
        return stat.S_IMODE(os.lstat(name).st_mode)
    return call


def _mkdir(name: str, mode: int):
    def call():
        os.mkdir(name, mode)
        return stat.S_IMODE(os.lstat(name).st_mode)
    return call


@pytest.mark.parametrize("uid,gid", CALLERS)
def test_new_objects_get_the_mode_asked_for_at_every_name_length(shared, uid, gid):
    m, u = shared.mnt, shared.upper
    for length in LENGTHS:
        for prefix, mode in (("f", 0o620), ("g", 0o642), ("h", 0o777)):
            name = f"open/{_name(prefix, length)}"
            assert as_caller(m, uid, gid, _create(name, mode)) == ("ok", mode), (length, mode)
            st = os.lstat(u / name)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid)
        name = f"open/{_name('d', length)}"
        assert as_caller(m, uid, gid, _mkdir(name, 0o777)) == ("ok", 0o777), length
        assert as_caller(m, uid, gid, lambda: os.mkfifo(f"open/{_name('p', length)}", 0o666)) \
            == ("ok", None)
        assert stat.S_IMODE(os.lstat(m / f"open/{_name('p', length)}").st_mode) == 0o666
        # A caller's umask is applied once, by the kernel.
        name = f"open/{_name('u', length)}"
        assert as_caller(m, uid, gid, _create(name, 0o666), umask=0o027) == ("ok", 0o640)


@pytest.mark.parametrize("uid,gid", CALLERS)
def test_names_of_whited_out_lower_entries_take_new_modes(shared, uid, gid):
    m, u = shared.mnt, shared.upper
    for length in LENGTHS:
        name = f"open/{_name('L', length)}"
        assert as_caller(m, uid, gid, lambda: os.unlink(name)) == ("ok", None)
        assert as_caller(m, uid, gid, lambda: os.path.lexists(name)) == ("ok", False)
        assert as_caller(m, uid, gid, _create(name, 0o620)) == ("ok", 0o620), length
        assert (m / name).read_bytes() == b""
        os.unlink(m / name)
        assert as_caller(m, uid, gid, _mkdir(name, 0o1777)) == ("ok", 0o1777), length
        assert as_caller(m, uid, gid, lambda: os.listdir(name)) == ("ok", [])
        assert stat.S_IMODE(os.lstat(u / name).st_mode) == 0o1777
    # No temporary or marker of any of it is left over, nor shown.
    assert sorted(os.listdir(u / ".nixfs/work")) == []
    assert all(not n.startswith(".wh.") for n in os.listdir(m / "open"))


@pytest.mark.parametrize("uid,gid", [NOBODY, OTHER])
def test_anyone_renames_in_a_directory_made_0777(shared, uid, gid):
    """pjdfstest rename/21: root makes d2 0777 and d2/n0 0700; another uid renames
    d2/n0 to d2/n1 and back, then moves a file of root's to another 0777 directory."""
    m = shared.mnt
    root = (0, 0)
    assert as_caller(m, *root, _mkdir("d2", 0o777)) == ("ok", 0o777)
    assert as_caller(m, *root, _mkdir("d3", 0o777)) == ("ok", 0o777)
    assert as_caller(m, *root, _mkdir("d2/n0", 0o700)) == ("ok", 0o700)
    assert as_caller(m, uid, gid, lambda: os.rename("d2/n0", "d2/n1")) == ("ok", None)
    assert as_caller(m, uid, gid, lambda: os.rename("d2/n1", "d2/n0")) == ("ok", None)
    assert sorted(os.listdir(m / "d2")) == ["n0"]
    # Moving a directory to another parent needs write access to it (its ".."): refused.
    assert as_caller(m, uid, gid, lambda: os.rename("d2/n0", "d3/n1")) == ("err", "EACCES")
    os.rmdir(m / "d2/n0")
    assert as_caller(m, *root, _create("d2/n0", 0o644)) == ("ok", 0o644)
    assert as_caller(m, uid, gid, lambda: os.rename("d2/n0", "d3/n1")) == ("ok", None)
    assert os.lstat(m / "d3/n1").st_uid == 0
    assert as_caller(m, *root, lambda: os.unlink("d3/n1")) == ("ok", None)
    assert as_caller(m, *root, lambda: os.unlink("d2/n0")) == ("err", "ENOENT")


def test_the_sticky_bit_protects_other_callers_entries(shared):
    m = shared.mnt
    assert as_caller(m, 0, 0, _mkdir("tmp", 0o1777)) == ("ok", 0o1777)
    assert as_caller(m, *OTHER, _create("tmp/theirs", 0o666)) == ("ok", 0o666)
    assert as_caller(m, *NOBODY, _create("tmp/mine", 0o666)) == ("ok", 0o666)
    assert as_caller(m, *NOBODY, lambda: os.rename("tmp/theirs", "tmp/x")) == ("err", "EPERM")
    assert as_caller(m, *NOBODY, lambda: os.rename("tmp/mine", "tmp/theirs")) == ("err", "EPERM")
    assert as_caller(m, *NOBODY, lambda: os.unlink("tmp/theirs")) == ("err", "EPERM")
    assert as_caller(m, *NOBODY, lambda: os.rename("tmp/mine", "tmp/mine2")) == ("ok", None)
    assert as_caller(m, *OTHER, lambda: os.rename("tmp/theirs", "tmp/mine2")) == ("err", "EPERM")
    assert as_caller(m, *OTHER, lambda: os.rename("tmp/theirs", "tmp/t2")) == ("ok", None)
    assert sorted(os.listdir(m / "tmp")) == ["mine2", "t2"]
    assert (os.lstat(m / "tmp/mine2").st_uid, os.lstat(m / "tmp/t2").st_uid) == (NOBODY[0], OTHER[0])
