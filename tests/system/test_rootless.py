"""nixfs as an ordinary user: through fusermount3, and inside `unshare -Urm`."""

import os
import sys

from conftest import make_lower


def prepare(user):
    base = user.dir("work")
    lower = make_lower(base / "lower")  # owned by root, as a shared store is
    os.chmod(lower / "dir/file", 0o644)
    up, mnt = base / "upper", base / "mnt"
    for path in (up, mnt):
        path.mkdir()
        os.chown(path, user.uid, user.gid)
    return lower, up, mnt


def test_rootless_mount_write_umount(user):
    lower, up, mnt = prepare(user)
    proc = user.nixfs("mount", "--lower", lower, "--upper", up, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        # Everything shows as the mounting user's: single-user Nix expects to own /nix.
        # (Only the user may look: root has no access to a mount without allow_other.)
        owners = user.run("stat", "-c", "%u:%g", mnt / "dir/file", mnt / "store").stdout.split()
        assert owners == [f"{user.uid}:{user.gid}"] * 2
        script = (f"set -e; echo more >> {mnt}/dir/file; chmod 600 {mnt}/dir/ro-file; "
                  f"mkdir {mnt}/new; echo x > {mnt}/new/f; rm {mnt}/top-file; "
                  f"mv {mnt}/dir/sub {mnt}/sub; (umask 222; echo ro > {mnt}/ro-new); "
                  f"cat {mnt}/dir/file")
        proc = user.run("sh", "-c", script)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "content\nmore\n"
    finally:
        proc = user.nixfs("umount", mnt)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.ismount(mnt)
    st = os.lstat(up / "dir/file")
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)  # copied up as the user's
    assert (up / "new/f").read_text() == "x\n"
    # Created read-only and written through the same open, as the user (no privilege to
    # open it for writing again).
    assert (up / "ro-new").read_text() == "ro\n" and os.stat(up / "ro-new").st_mode & 0o777 == 0o444
    assert (up / ".wh.top-file").exists()
    assert os.stat(lower / "dir/file").st_uid == 0


def test_rootless_in_user_namespace(user):
    lower, up, mnt = prepare(user)
    nixfs = f"{sys.executable} -m nixfs"
    script = (f"set -e; {nixfs} mount --lower {lower} --upper {up} {mnt}; "
              f"echo hello > {mnt}/dir/new; stat -c %u {mnt}/dir/file; "
              f"rm -rf {mnt}/store; ls {mnt}; {nixfs} umount {mnt}")
    proc = user.run("unshare", "-Urm", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "dir", "top-file"]  # root inside is the user outside
    assert (up / "dir/new").read_text() == "hello\n"
    assert os.stat(up / "dir/new").st_uid == user.uid
    assert (up / ".wh.store").exists()
    assert not os.path.ismount(mnt)


def test_root_daemon_with_allow_other_keeps_owners_and_permissions(user, tmp_path):
    from harness import NixfsMount
    lower = make_lower(user.home / "lower")
    os.chmod(lower / "dir/file", 0o600)  # root's alone
    (lower / "shared").mkdir(mode=0o1777)
    os.chmod(lower / "shared", 0o1777)
    up, mnt = user.home / "upper", user.home / "mnt"
    up.mkdir()
    mnt.mkdir()
    with NixfsMount(lower, up, mnt, "allow_other"):
        assert user.run("cat", mnt / "top-file").stdout == "top\n"
        denied = user.run("cat", mnt / "dir/file")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert user.run("touch", mnt / "dir/new").returncode != 0  # dir is root's 0755
        made = user.run("sh", "-c", f"echo mine > {mnt}/shared/mine && mkdir {mnt}/shared/d")
        assert made.returncode == 0, made.stderr
        st = os.lstat(mnt / "shared/mine")
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
        # The sticky directory protects root's files from the user.
        assert user.run("rm", "-f", mnt / "shared").returncode != 0
    for name in ("mine", "d"):
        st = os.lstat(up / "shared" / name)
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
