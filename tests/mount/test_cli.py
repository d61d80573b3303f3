"""`nixfs mount` and `nixfs umount` as users meet them: errors, helpers, fstab."""

import os
import shutil
import subprocess

import pytest
from conftest import make_lower, needs_root, run
from harness import NIXFS, REPO, NixfsMount, force_unmount, run_nixfs


def expect_usage_error(proc, *words):
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nixfs: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def dirs(tmp_path):
    for name in ("lower", "upper", "mnt"):
        (tmp_path / name).mkdir()
    (tmp_path / "file").write_text("not a directory")
    return tmp_path


def mount(d, lower="lower", upper="upper", mnt="mnt", *extra):
    return run_nixfs("mount", "--lower", d / lower, "--upper", d / upper, *extra, d / mnt)


def test_bad_layers(dirs):
    expect_usage_error(mount(dirs, lower="nope"), "lower", "does not exist")
    expect_usage_error(mount(dirs, lower="file"), "lower", "not a directory")
    expect_usage_error(mount(dirs, upper="nope"), "upper", "does not exist")
    expect_usage_error(mount(dirs, upper="file"), "upper", "not a directory")
    expect_usage_error(mount(dirs, upper="lower"), "same directory")
    (dirs / "lower/up").mkdir()
    expect_usage_error(mount(dirs, upper="lower/up"), "upper", "inside the lower")
    (dirs / "upper/low").mkdir()
    expect_usage_error(mount(dirs, lower="upper/low"), "lower", "inside the upper")


def test_bad_mountpoint(dirs):
    expect_usage_error(mount(dirs, mnt="nope"), "does not exist")
    expect_usage_error(mount(dirs, mnt="file"), "not a directory")
    (dirs / "lower/m").mkdir()
    expect_usage_error(mount(dirs, mnt="lower/m"), "inside the lower")
    with NixfsMount(dirs / "lower", dirs / "upper", dirs / "mnt"):
        (dirs / "upper2").mkdir()
        expect_usage_error(mount(dirs, upper="upper2"), "a nixfs mount already", "pid ",
                           f"lower {dirs / 'lower'}")
    (dirs / "mnt/up").mkdir()
    expect_usage_error(mount(dirs, upper="mnt/up"), "upper", "inside the mountpoint", "hide")
    expect_usage_error(mount(dirs, upper="mnt", mnt="mnt"), "upper", "is the mountpoint")


def test_bad_options(dirs):
    expect_usage_error(mount(dirs, "lower", "upper", "mnt", "-o", "frobnicate"), "unknown mount option")
    for opt, message in (("poll_us=fast", "poll_us must be"), ("poll_us=20000", "poll_us must be"),
                         ("xattr=maybe", "xattr must be on or off"),
                         ("generation=newest", "generation must be auto or off"),
                         ("refresh_attrs=later", "refresh_attrs must be on or off"),
                         ("lower_timeout=-1", "lower_timeout must be"),
                         ("owner_only,allow_other", "contradict")):
        expect_usage_error(mount(dirs, "lower", "upper", "mnt", "-o", opt), message)
    expect_usage_error(run_nixfs("mount", "--lower", dirs / "lower", dirs / "mnt"), "--upper")
    expect_usage_error(run_nixfs("umount", dirs / "mnt"), "not mounted")
    expect_usage_error(run_nixfs("frobnicate"), "unknown command 'frobnicate'", "commands: mount")


def test_unknown_commands_are_not_taken_for_the_mount_helper(dirs):
    """A misspelt command gets the list of commands, not the mount helper's usage."""
    expect_usage_error(run_nixfs("publsh", dirs / "lower"), "unknown command 'publsh'",
                       "commands: mount, umount, run")
    proc = run_nixfs("mnt", dirs / "mnt")
    expect_usage_error(proc, "unknown command 'mnt'", "did you mean 'mount'?")
    assert "usage:" not in proc.stderr
    expect_usage_error(run_nixfs("umont", dirs / "mnt"), "did you mean 'umount'?")
    # The helper form mount.fuse3 uses still reaches the mount (and its checks).
    proc = run_nixfs("nixfs", dirs / "mnt", "-o", f"rw,lowerdir={dirs / 'nope'},upperdir={dirs / 'upper'}")
    expect_usage_error(proc, "lower", "does not exist")


def test_a_reader_that_goes_away_gets_no_traceback():
    """`nixfs ... | head -1`: the command ends quietly, as a shell tool does, when its
    reader closes the pipe (help is printed to a pipe whose reading end is closed)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(NIXFS + ["--help"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc
    assert proc.stderr == "", proc.stderr


@needs_root
def test_missing_dev_fuse(dirs):
    # A mount namespace whose /dev lacks fuse, as in a container started without it.
    script = ("mount -t tmpfs none /dev && "
              f"exec {' '.join(map(str, ['env', 'PYTHONPATH=' + os.getcwd(), *__import__('harness').NIXFS]))}"
              f" mount --lower {dirs / 'lower'} --upper {dirs / 'upper'} {dirs / 'mnt'}")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, cwd=str(__import__("harness").REPO))
    expect_usage_error(proc, "/dev/fuse does not exist", "--device /dev/fuse")


def test_dev_fuse_not_accessible(user):
    d = user.dir("d")
    for name in ("lower", "upper", "mnt"):
        user.run("mkdir", d / name, check=True)
    os.chmod("/dev/fuse", 0o600)
    proc = user.nixfs("mount", "--lower", d / "lower", "--upper", d / "upper", d / "mnt")
    expect_usage_error(proc, "/dev/fuse is not accessible", "chmod 666 /dev/fuse")


def test_fusermount3_missing(user, tmp_path):
    d = user.dir("d")
    for name in ("lower", "upper", "mnt"):
        user.run("mkdir", d / name, check=True)
    proc = user.nixfs("mount", "--lower", d / "lower", "--upper", d / "upper", d / "mnt",
                      env={"PATH": "/nonexistent"})
    expect_usage_error(proc, "fusermount3 not found", "apt-get install fuse3")


def test_umount_busy_then_lazy(dirs):
    with NixfsMount(dirs / "lower", dirs / "upper", dirs / "mnt"):
        with open(dirs / "mnt/f", "w") as f:
            proc = run_nixfs("umount", dirs / "mnt")
            expect_usage_error(proc, "busy")
            f.write("still open")
        assert (dirs / "upper/f").read_text() == "still open"


@needs_root
def test_mount_t_fuse_nixfs_and_fstab(tmp_path):
    helper = shutil.which("nixfs", path="/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert helper, "the mount helper is not installed: run scripts/setup"
    lower = make_lower(tmp_path / "lower")
    upper, mnt = tmp_path / "upper", tmp_path / "mnt"
    upper.mkdir()
    mnt.mkdir()
    try:
        proc = run("mount", "-t", "fuse.nixfs", "nixfs", mnt, "-o", f"lowerdir={lower},upperdir={upper}")
        assert proc.returncode == 0, proc.stderr
        assert (mnt / "dir/file").read_text() == "content\n"
        assert run_nixfs("umount", mnt).returncode == 0
        assert not os.path.ismount(mnt)
        fstab = tmp_path / "fstab"
        fstab.write_text(f"nixfs {mnt} fuse.nixfs lowerdir={lower},upperdir={upper},noauto,ro 0 0\n")
        proc = run("mount", "-T", fstab, mnt)
        assert proc.returncode == 0, proc.stderr
        assert (mnt / "top-file").read_text() == "top\n"
        from nixfs.runtime import find_mount
        assert "ro" in find_mount(str(mnt)).options.split(",")
        assert find_mount(str(mnt)).fstype == "fuse.nixfs"
        assert run("umount", mnt).returncode == 0
    finally:
        force_unmount(mnt)
