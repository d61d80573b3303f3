"""The merged view through a real FUSE mount."""

import errno
import os
import stat
import subprocess

from conftest import OLD_NS, needs_root
from harness import NixfsMount, snapshot


def _errno(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def test_merged_view_shows_the_lower(mounted, lower):
    m = mounted.mnt
    assert sorted(os.listdir(m)) == ["dir", "store", "top-file"]
    assert (m / "store/aaa-pkg/bin/pkg").read_bytes() == b"#!/bin/sh\necho pkg\n"
    assert os.readlink(m / "dir/link-abs") == "/etc/passwd"  # shown, never followed
    assert os.lstat(m / "dir/link-abs").st_mode & stat.S_IFMT(0o170000) == stat.S_IFLNK
    assert stat.S_ISFIFO(os.lstat(m / "dir/fifo").st_mode)
    assert os.getxattr(m / "dir/xattr-file", "user.test") == b"value"
    assert os.lstat(m / "dir/file").st_mtime_ns == OLD_NS
    assert os.lstat(m / "dir/hard1").st_nlink == 2
    view = snapshot(m, times_before=2**63)
    expected = snapshot(lower, times_before=2**63)
    assert view.pop(b".")["nlink"] == 1  # a merged directory, as kernel overlayfs says
    expected.pop(b".")
    assert view == expected


def test_own_inode_numbers_stable_across_copy_up(mounted, lower):
    m = mounted.mnt
    lower_inos = {os.lstat(p).st_ino for p in lower.rglob("*")}
    before = os.stat(m / "dir/file").st_ino
    assert before not in lower_inos
    with open(m / "dir/file", "a") as f:
        f.write("more\n")
    assert os.stat(m / "dir/file").st_ino == before
    assert (mounted.upper / "dir/file").read_bytes() == b"content\nmore\n"


def test_copy_up_keeps_metadata(mounted):
    m, u = mounted.mnt, mounted.upper
    os.chmod(m / "dir/xattr-file", 0o600)
    st = os.lstat(u / "dir/xattr-file")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == OLD_NS
    assert os.getxattr(u / "dir/xattr-file", "user.test") == b"value"
    assert (u / "dir/xattr-file").read_bytes() == b"has xattrs\n"
    # The parent copied up along the way keeps its times too.
    assert os.lstat(u / "dir").st_mtime_ns == OLD_NS
    assert os.lstat(m / "dir").st_mtime_ns == OLD_NS


def test_upper_is_a_plain_tree_and_state_is_hidden(mounted):
    m, u = mounted.mnt, mounted.upper
    (m / "a").mkdir()
    (m / "a/b").write_text("plain")
    assert (u / "a/b").read_text() == "plain"
    assert (u / ".nixfs").is_dir()
    assert ".nixfs" not in os.listdir(m)
    assert _errno(os.lstat, m / ".nixfs") == errno.ENOENT
    assert _errno(os.mkdir, m / ".nixfs") == errno.EPERM


def test_whiteouts_are_oci_files_and_never_shown(mounted):
    m, u = mounted.mnt, mounted.upper
    os.unlink(m / "dir/file")
    assert not (m / "dir/file").exists()
    assert (u / "dir/.wh.file").is_file()
    assert ".wh.file" not in os.listdir(m / "dir")
    assert _errno(os.lstat, m / "dir/.wh.file") == errno.ENOENT
    assert _errno(os.open, m / "dir/.wh.new", os.O_CREAT | os.O_WRONLY) == errno.EINVAL
    assert _errno(os.mkdir, m / ".wh.x") == errno.EINVAL
    # Recreating the name shows the new file only.
    (m / "dir/file").write_text("new")
    assert (m / "dir/file").read_text() == "new"


def test_replaced_directory_is_opaque(mounted):
    m, u = mounted.mnt, mounted.upper
    subprocess.run(["rm", "-rf", str(m / "dir/sub")], check=True)
    assert not (m / "dir/sub").exists()
    (m / "dir/sub").mkdir()
    assert os.listdir(m / "dir/sub") == []
    assert (u / "dir/.wh.sub").exists()
    assert (u / "dir/sub/.wh..wh..opq").exists()


def test_rename_lower_directory_records_a_redirect(mounted):
    m, u = mounted.mnt, mounted.upper
    os.rename(m / "dir/sub", m / "moved")
    assert not (m / "dir/sub").exists()
    assert (m / "moved/nested/deep/f").read_text() == "deep\n"
    assert os.getxattr(m / "moved", "user.dir") == b"yes"
    assert (u / "moved/.wh..wh..nixfs-redirect").read_text().strip() == "/dir/sub"
    os.rename(m / "moved", m / "store/again")
    assert (m / "store/again/nested/deep/f").read_text() == "deep\n"
    # A new directory where the old one was is empty.
    (m / "dir/sub").mkdir()
    assert os.listdir(m / "dir/sub") == []


def test_rmdir_needs_merged_emptiness(mounted):
    m = mounted.mnt
    assert _errno(os.rmdir, m / "dir/ro-dir") == errno.ENOTEMPTY
    os.chmod(m / "dir/ro-dir", 0o755)
    os.unlink(m / "dir/ro-dir/x")
    os.rmdir(m / "dir/ro-dir")
    assert not (m / "dir/ro-dir").exists()


def test_hard_links(mounted):
    m, u = mounted.mnt, mounted.upper
    os.link(m / "dir/file", m / "dir/file-link")
    a, b = os.lstat(m / "dir/file"), os.lstat(m / "dir/file-link")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    with open(m / "dir/file-link", "a") as f:
        f.write("via link\n")
    assert (m / "dir/file").read_text() == "content\nvia link\n"
    assert os.lstat(u / "dir/file").st_ino == os.lstat(u / "dir/file-link").st_ino
    os.unlink(m / "dir/file")
    assert os.lstat(m / "dir/file-link").st_nlink == 1


def test_names_up_to_255_bytes(mounted):
    m = mounted.mnt
    long = "n" * 255
    (m / long).write_text("x")
    assert (m / long).read_text() == "x"
    assert _errno(os.lstat, m / ("n" * 256)) == errno.ENAMETOOLONG
    assert _errno(os.mkdir, m / ("n" * 256)) == errno.ENAMETOOLONG


def test_long_lower_name_is_whited_out_with_a_device(tmp_path, upper, mnt):
    lower = tmp_path / "lower"
    lower.mkdir()
    long = "L" * 254
    (lower / long).write_text("lower")
    with NixfsMount(lower, upper, mnt):
        os.unlink(mnt / long)
        assert not (mnt / long).exists()
        st = os.lstat(upper / long)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        (mnt / long).mkdir()
        assert os.listdir(mnt / long) == []
        os.rmdir(mnt / long)
        assert not (mnt / long).exists()


def test_sparse_large_file_copy_up(tmp_path, upper, mnt):
    big = 5 * 2**30  # over 4 GiB
    lower = tmp_path / "lower"
    lower.mkdir()
    with open(lower / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(big - 4)
        f.write(b"tail")
    with NixfsMount(lower, upper, mnt):
        with open(mnt / "sparse", "r+b") as f:
            f.seek(big // 2)
            f.write(b"middle")
        st = os.stat(upper / "sparse")
        assert st.st_size == big == os.stat(mnt / "sparse").st_size
        assert st.st_blocks * 512 < 64 << 20, "copy-up did not keep the file sparse"
        with open(mnt / "sparse", "rb") as f:
            assert f.read(4) == b"head"
            f.seek(big - 4)
            assert f.read() == b"tail"
            f.seek(big // 2)
            assert f.read(6) == b"middle"
        with open(mnt / "new-big", "wb") as f:
            f.seek(big)
            f.write(b"end")
        assert os.stat(upper / "new-big").st_size == big + 3


def test_append_truncate_fsync(mounted):
    m = mounted.mnt
    fd = os.open(m / "dir/file", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"one\n")
    os.write(fd, b"two\n")
    os.fsync(fd)
    os.close(fd)
    assert (m / "dir/file").read_bytes() == b"content\none\ntwo\n"
    os.truncate(m / "dir/file", 3)
    assert (m / "dir/file").read_bytes() == b"con"
    with open(m / "top-file", "w") as f:  # O_TRUNC on a lower file
        f.write("t")
    assert (m / "top-file").read_text() == "t"


def test_xattrs_and_statfs(mounted):
    m, u = mounted.mnt, mounted.upper
    os.setxattr(m / "dir/file", "user.new", b"1")
    assert os.getxattr(m / "dir/file", "user.new") == b"1"
    assert os.getxattr(u / "dir/file", "user.new") == b"1"
    os.removexattr(m / "dir/xattr-file", "user.test")
    assert "user.test" not in os.listxattr(m / "dir/xattr-file")
    assert _errno(os.removexattr, m / "top-file", "user.none") == errno.ENODATA
    assert not (u / "top-file").exists(), "removing a missing xattr must not copy up"
    vfs = os.statvfs(m)
    assert vfs.f_namemax == 255 and vfs.f_blocks > 0


def test_reader_sees_copy_up(mounted):
    m = mounted.mnt
    with open(m / "dir/file", "rb") as reader:
        with open(m / "dir/file", "r+b") as writer:
            writer.write(b"CHANGED")
        assert reader.read() == b"CHANGED\n"


def test_readonly_mount(lower, upper, mnt):
    with NixfsMount(lower, upper, mnt, "ro"):
        assert (mnt / "dir/file").read_text() == "content\n"
        assert _errno(os.unlink, mnt / "dir/file") == errno.EROFS
        assert _errno(os.mkdir, mnt / "x") == errno.EROFS
    assert not (upper / "dir").exists()


def test_second_daemon_on_same_upper_is_refused(mounted, tmp_path):
    other = tmp_path / "mnt2"
    other.mkdir()
    from harness import run_nixfs
    proc = run_nixfs("mount", "--lower", mounted.lower, "--upper", mounted.upper, other)
    assert proc.returncode == 2
    assert "in use by another nixfs" in proc.stderr
    assert not os.path.ismount(other)


def test_remount_keeps_everything(lower, upper, mnt):
    with NixfsMount(lower, upper, mnt):
        os.unlink(mnt / "dir/file")
        os.rename(mnt / "dir/sub", mnt / "sub2")
        (mnt / "new").write_text("new")
        first = snapshot(mnt)
    with NixfsMount(lower, upper, mnt):
        assert snapshot(mnt) == first


@needs_root
def test_kernel_overlay_upper_fixture(tmp_path, mnt):
    """An upper written by kernel overlayfs (char-device whiteouts, opaque xattr)."""
    tests = os.path.dirname(os.path.dirname(__file__))
    fixture = os.path.join(tests, "fixtures", "kernel-overlay-upper.tar")
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xf", fixture, "-C", str(tmp_path)],
                   check=True)
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    assert os.getxattr(upper / "store/aaa-pkg/bin", "trusted.overlay.opaque") == b"y"
    with NixfsMount(lower, upper, mnt):
        files = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
        assert files == ["store", "store/aaa-pkg", "store/aaa-pkg/bin", "store/aaa-pkg/bin/new",
                         "store/bbb-lib", "store/bbb-lib/lib", "store/ddd-new", "store/ddd-new/f"]
        assert os.listxattr(mnt / "store/aaa-pkg/bin") == []
        # The kernel's whiteouts can be written over and restored.
        (mnt / "store/ccc-doc").mkdir()
        assert os.listdir(mnt / "store/ccc-doc") == []
        (mnt / "store/bbb-lib/lib/libb.so").write_text("again")
        os.unlink(mnt / "store/bbb-lib/lib/libb.so")
        assert os.listdir(mnt / "store/bbb-lib/lib") == []


def test_nothing_written_to_lower_layer(lower, upper, mnt):
    """The `lower` fixture checks the lower after a busy session."""
    with NixfsMount(lower, upper, mnt):
        for p in list(mnt.rglob("*")):
            if p.is_symlink() or not p.exists():
                continue
            if p.is_file() and not stat.S_ISFIFO(os.lstat(p).st_mode):
                os.chmod(p, 0o644)
                with open(p, "ab") as f:
                    f.write(b"!")
        subprocess.run(["rm", "-rf", str(mnt / "store")], check=True)
        os.rename(mnt / "dir", mnt / "dir2")


def test_node_table_stays_within_its_budget(tmp_path, upper, mnt):
    import json
    import time

    from harness import run_nixfs
    lower = tmp_path / "lower"
    for d in range(30):
        (lower / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (lower / f"d{d}/f{f}").write_text("x")
    with NixfsMount(lower, upper, mnt, "max_nodes=500") as m:
        for d in range(30):
            for f in range(100):
                os.lstat(mnt / f"d{d}/f{f}")
        time.sleep(0.5)  # the kernel's FORGETs arrive shortly after the invalidations
        status = json.loads(run_nixfs("status", "--json", m.mnt).stdout)
        assert status["nodes_trimmed"] > 0
        assert status["nodes"] < 800, status["nodes"]
        assert (mnt / "d0/f0").read_text() == "x"  # forgotten nodes come back on demand
