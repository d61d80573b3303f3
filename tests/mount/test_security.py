"""Who may use a mount: a root mount is for everyone, like a kernel mount (unless
``owner_only``), an ordinary user's only for that user (unless ``allow_other``); the
kernel checks permissions (``default_permissions``) against the shown owners."""

import os

from conftest import make_lower
from harness import NixfsMount


def _mount_options(mnt) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                return fields[5].split(",") + line.split(" - ")[1].split()[2].split(",")
    raise AssertionError(f"{mnt} is not mounted")


def _layers(user):
    lower = make_lower(user.home / "lower")
    os.chmod(lower / "dir/file", 0o600)  # root's alone
    (lower / "theirs").write_bytes(b"the user's\n")
    os.chown(lower / "theirs", user.uid, user.gid)
    os.chmod(lower / "theirs", 0o600)
    up, mnt = user.home / "upper", user.home / "mnt"
    up.mkdir()
    mnt.mkdir()
    return lower, up, mnt


def test_root_mount_is_for_everyone_by_default(user):
    lower, up, mnt = _layers(user)
    with NixfsMount(lower, up, mnt, extra_args=["--no-nix"]):
        opts = _mount_options(mnt)
        assert "allow_other" in opts and "default_permissions" in opts
        assert user.run("cat", mnt / "top-file").stdout == "top\n"
        assert user.run("cat", mnt / "theirs").stdout == "the user's\n"
        denied = user.run("cat", mnt / "dir/file")  # root's 0600: the kernel says no
        assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_user_mount_stays_private_unless_asked(user):
    lower, up, mnt = _layers(user)
    for path in (up, mnt):
        os.chown(path, user.uid, user.gid)
    proc = user.nixfs("mount", "--no-nix", "--lower", lower, "--upper", up, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        assert "allow_other" not in _mount_options(mnt)
    finally:
        user.nixfs("umount", mnt)


def test_owner_only_keeps_a_root_mount_to_root(user):
    lower, up, mnt = _layers(user)
    with NixfsMount(lower, up, mnt, "owner_only", extra_args=["--no-nix"]):
        opts = _mount_options(mnt)
        assert "allow_other" not in opts and "default_permissions" in opts
        for cmd in (["stat", mnt], ["cat", mnt / "top-file"], ["ls", mnt]):
            proc = user.run(*cmd)
            assert proc.returncode != 0 and "Permission denied" in proc.stderr, cmd
        assert (mnt / "top-file").read_bytes() == b"top\n"  # its owner uses it


def test_allow_other_lets_the_kernel_check_permissions(user):
    lower, up, mnt = _layers(user)
    with NixfsMount(lower, up, mnt, "allow_other", extra_args=["--no-nix"]):
        opts = _mount_options(mnt)
        assert "allow_other" in opts and "default_permissions" in opts
        denied = user.run("cat", mnt / "dir/file")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert user.run("cat", mnt / "theirs").stdout == "the user's\n"
        # Writing root's file, or into root's directory, is refused too (and copies nothing).
        assert user.run("sh", "-c", f"echo x >> {mnt}/top-file").returncode != 0
        assert user.run("touch", mnt / "dir/new").returncode != 0
        assert user.run("chmod", "666", mnt / "dir/file").returncode != 0
        mine = user.run("sh", "-c", f"echo more >> {mnt}/theirs && cat {mnt}/theirs")
        assert mine.stdout == "the user's\nmore\n", mine.stderr
    assert not (up / "top-file").exists() and not (up / "dir/file").exists()
    assert (up / "theirs").stat().st_uid == user.uid
