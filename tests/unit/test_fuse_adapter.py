"""The FUSE adapter (nixfs/fuse/ops.py) driven in-process against a recording fake model.

No mount: each handler is awaited as pyfuse3 would call it, so these check the translation
both ways in isolation: model exceptions to errnos through the one gate, the model's
answers to pyfuse3's entry fields, requests to model calls (flags, setattr fields), and
that the kernel's lookup counts are the model's alone (readdir reports entries sent and
refused; lookup, create and the rest are counted by the model).
"""

import errno
import logging
import os
import stat
import types

import pyfuse3
import pytest

from fake_overlay import ROOT_INO, FakeOverlay
from nixfs.fuse import features
from nixfs.fuse.features import Features
from nixfs.fuse.notifier import ListingSnapshots
from nixfs.fuse.ops import FuseOps
from nixfs.overlay import FIRST_HANDLE, Caller, SetAttr

CTX = types.SimpleNamespace(uid=1001, gid=1002, pid=77, umask=0o022)


@pytest.fixture(autouse=True)
def stock_pyfuse3(monkeypatch):
    """As a stock pyfuse3: no kept attributes or listings in C state (a test turns on
    the one feature it is about)."""
    monkeypatch.setattr(features, "FEATURES", Features())


@pytest.fixture
def fs():
    return FakeOverlay()


@pytest.fixture
def ops(fs):
    return FuseOps(fs, ListingSnapshots())


class Replies:
    """A readdir reply buffer with room for *room* entries, as pyfuse3's readdir_reply."""

    def __init__(self, room: int):
        self.room = room
        self.sent: list[tuple[bytes, int, int]] = []  # (name, inode, next id)

    def __call__(self, token, name, entry, next_id) -> bool:
        assert token == "token"
        if len(self.sent) == self.room:
            return False
        self.sent.append((name, entry.st_ino, next_id))
        return True


async def _fuse_errno(handler, *args) -> int:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await handler(*args)
    return caught.value.errno


# ------------------------------------------------------------------ the one error gate

REQUESTS = [  # (handler, arguments)
    ("lookup", (ROOT_INO, b"x", CTX)),
    ("getattr", (ROOT_INO, CTX)),
    ("unlink", (ROOT_INO, b"x", CTX)),
    ("rename", (ROOT_INO, b"x", ROOT_INO, b"y", 0, CTX)),
    ("mkdir", (ROOT_INO, b"d", 0o755, CTX)),
    ("setxattr", (ROOT_INO, b"user.a", b"v", CTX)),
    ("readlink", (ROOT_INO, CTX)),
]


@pytest.mark.parametrize("name,args", REQUESTS, ids=[r[0] for r in REQUESTS])
@pytest.mark.parametrize("raised,expected", [
    (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT),
    (OSError(errno.EXDEV, "cross"), errno.EXDEV),
    (OSError(errno.EROFS, "read-only"), errno.EROFS),
    (OSError("no errno"), errno.EIO),
    (pyfuse3.FUSEError(errno.ENOTEMPTY), errno.ENOTEMPTY),
], ids=["ENOENT", "EXDEV", "EROFS", "none", "FUSEError"])
async def test_model_errors_reach_the_kernel_as_their_errno(fs, ops, name, args, raised,
                                                           expected):
    fs.fail_with = raised
    assert await _fuse_errno(getattr(ops, name), *args) == expected
    assert ops.requests[name] == 1 and ops.errors == 0


async def test_any_other_exception_is_logged_and_answered_eio(fs, ops, caplog):
    fs.fail_with = ValueError("a bug in the model")
    with caplog.at_level(logging.ERROR, logger="nixfs.fuse.errors"):
        assert await _fuse_errno(ops.getattr, ROOT_INO, CTX) == errno.EIO
    assert ops.errors == 1
    assert "getattr" in caplog.text and "a bug in the model" in caplog.text


async def test_an_unknown_inode_is_estale(ops):
    assert await _fuse_errno(ops.getattr, 999, CTX) == errno.ESTALE


# ------------------------------------------------------------------ answers to entries

def _assert_entry_of(entry, attr):
    st = attr.st
    assert (entry.st_ino, entry.generation) == (attr.ino, 0)
    assert entry.entry_timeout == entry.attr_timeout == attr.ttl
    # nlink, uid and gid are the model's (merged directory, owner mapping), not the layer's
    assert (entry.st_nlink, entry.st_uid, entry.st_gid) == (attr.nlink, attr.uid, attr.gid)
    for field in ("st_mode", "st_rdev", "st_size", "st_blksize", "st_blocks",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
        assert getattr(entry, field) == getattr(st, field), field


async def test_lookup_answers_the_models_attributes(fs, ops):
    entry = await ops.lookup(ROOT_INO, b"x", CTX)
    (parent, name), = fs.called("lookup")
    assert parent is fs.root and name == b"x"
    _assert_entry_of(entry, fs.attr(fs.nodes[entry.st_ino]))


async def test_a_negative_entry_is_inode_0_with_its_timeout(fs, ops):
    entry = await ops.lookup(ROOT_INO, b"negative", CTX)
    assert entry.st_ino == 0 and entry.entry_timeout == 86400.0


async def test_getattr_and_mknod_answer_every_field(fs, ops):
    _assert_entry_of(await ops.getattr(ROOT_INO, CTX), fs.attr(fs.root))
    entry = await ops.mknod(ROOT_INO, b"dev", stat.S_IFCHR | 0o600, 0x0803, CTX)
    assert entry.st_rdev == 0x0803 and stat.S_ISCHR(entry.st_mode)
    _assert_entry_of(entry, fs.attr(fs.nodes[entry.st_ino]))
    (_, _, mode, rdev, caller), = fs.called("mknod")
    assert (mode, rdev, caller) == (stat.S_IFCHR | 0o600, 0x0803, Caller(1001, 1002))


async def test_statfs_copies_every_field(fs, ops):
    out = await ops.statfs(CTX)
    vfs = fs.statvfs
    for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
        assert getattr(out, field) == getattr(vfs, field), field


# ------------------------------------------------------------------ lookup counts

async def test_making_calls_are_counted_by_the_model_alone(fs, ops):
    """lookup, mkdir, mknod, symlink, create and link: one reference each, taken by the
    model when it answers; the adapter reports nothing more."""
    inos = [(await ops.lookup(ROOT_INO, b"l", CTX)).st_ino,
            (await ops.mkdir(ROOT_INO, b"d", 0o755, CTX)).st_ino,
            (await ops.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o644, 0, CTX)).st_ino,
            (await ops.symlink(ROOT_INO, b"s", b"target", CTX)).st_ino,
            (await ops.create(ROOT_INO, b"c", 0o644, os.O_WRONLY, CTX))[1].st_ino]
    linked = (await ops.link(inos[0], ROOT_INO, b"l2", CTX)).st_ino
    assert linked == inos[0]
    assert [fs.refs[i] for i in inos] == [2, 1, 1, 1, 1]
    assert not fs.called("entry_sent") and not fs.called("entry_refused")


async def test_forget_passes_through(fs, ops):
    await ops.lookup(ROOT_INO, b"x", CTX)
    ops.forget([(2, 1), (40, 3)])
    assert fs.called("forget") == [(2, 1), (40, 3)]
    assert fs.refs[2] == 0 and ops.requests["forget"] == 1


async def test_a_listing_reports_each_entry_sent(fs):
    replies = Replies(room=10)
    ops = FuseOps(fs, ListingSnapshots(), readdir_reply=replies)
    fh = await ops.opendir(ROOT_INO, CTX)
    assert await ops.readdir(fh, 0, "token") is True
    assert replies.sent[:2] == [(b".", ROOT_INO, 1), (b"..", ROOT_INO, 2)]
    assert [(n, i) for n, _, i in replies.sent[2:]] == [(b"a", 3), (b"b", 4), (b"c", 5)]
    sent = [node.ino for node, in fs.called("entry_sent")]
    assert sent == [ino for _, ino, _ in replies.sent[2:]]
    assert all(fs.refs[ino] == 1 for ino in sent) and not fs.refused


async def test_a_full_reply_reports_the_entry_refused_and_goes_on_from_it(fs):
    replies = Replies(room=3)  # ".", "..", "a"
    ops = FuseOps(fs, ListingSnapshots(), readdir_reply=replies)
    fh = await ops.opendir(ROOT_INO, CTX)
    assert await ops.readdir(fh, 0, "token") is False
    a, = [node for node, in fs.called("entry_sent")]
    b, = [node for node, in fs.called("entry_refused")]
    assert (a.name, b.name) == (b"a", b"b") and fs.refs[b.ino] == 0
    assert len(fs.called("readdir_entry")) == 2  # nothing asked past the refused one
    next_id = replies.sent[-1][2]
    replies.sent.clear()
    assert await ops.readdir(fh, next_id, "token") is True
    assert [n for n, _, _ in replies.sent] == [b"b", b"c"]
    assert [node.name for node, in fs.called("entry_sent")] == [b"a", b"b", b"c"]


async def test_an_entry_gone_meanwhile_is_left_out_unreported(fs):
    fs.gone = {b"b"}
    replies = Replies(room=10)
    ops = FuseOps(fs, ListingSnapshots(), readdir_reply=replies)
    fh = await ops.opendir(ROOT_INO, CTX)
    assert await ops.readdir(fh, 0, "token") is True
    assert [n for n, _, _ in replies.sent[2:]] == [b"a", b"c"]
    assert [(n, i) for n, _, i in replies.sent[2:]] == [(b"a", 3), (b"c", 5)]  # offsets kept
    assert [node.name for node, in fs.called("entry_sent")] == [b"a", b"c"]


class NodelessReplies(Replies):
    """pyfuse3's readdir_reply_without_node beside Replies, into the same buffer."""

    def without_node(self, token, name, ino, mode, next_id) -> bool:
        assert token == "token" and stat.S_ISREG(mode)
        if len(self.sent) == self.room:
            return False
        self.sent.append((name, ino, next_id))
        return True


async def test_entries_without_a_node_are_sent_so_and_never_counted(fs):
    fs.nodeless = {b"a", b"c"}
    replies = NodelessReplies(room=4)  # ".", "..", "a", "b": "c" waits for the next reply
    ops = FuseOps(fs, ListingSnapshots(), readdir_reply=replies,
                  readdir_reply_without_node=replies.without_node)
    fh = await ops.opendir(ROOT_INO, CTX)
    assert await ops.readdir(fh, 0, "token") is False
    b, = [node for node, in fs.called("entry_sent")]
    assert replies.sent[2:] == [(b"a", 1000, 3), (b"b", b.ino, 4)]
    assert not fs.called("entry_refused")  # "c" was refused, but it has no node
    replies.sent.clear()
    assert await ops.readdir(fh, replies_next := 4, "token") is True  # b's next id
    assert replies.sent == [(b"c", 1002, replies_next + 1)]
    assert [node.name for node, in fs.called("entry_sent")] == [b"b"]


async def test_dot_dot_of_a_subdirectory_is_its_parent(fs):
    sub = fs.add(fs.root, b"sub", stat.S_IFDIR)
    replies = Replies(room=2)
    ops = FuseOps(fs, ListingSnapshots(), readdir_reply=replies)
    fh = await ops.opendir(sub.ino, CTX)
    assert await ops.readdir(fh, 0, "token") is False
    assert replies.sent == [(b".", sub.ino, 1), (b"..", ROOT_INO, 2)]
    assert not fs.called("entry_sent")  # no reference for "." and ".."
    assert [node.name for node, in fs.called("entry_refused")] == [b"a"]


# ------------------------------------------------------------------ requests to model calls

async def test_open_passes_the_flags_and_keeps_the_page_cache(fs, ops):
    flags = os.O_RDWR | os.O_APPEND | os.O_NOATIME
    info = await ops.open(ROOT_INO, flags, CTX)
    (node, passed), = fs.called("open")
    assert node is fs.root and passed == flags
    assert info.fh >= FIRST_HANDLE and info.keep_cache
    assert await ops.read(info.fh, 10, 20) == b"by handle"
    assert fs.called("read") == [(fs.handles[info.fh], 10, 20)]


async def test_create_passes_mode_flags_and_caller(fs, ops):
    info, entry = await ops.create(ROOT_INO, b"new", 0o600, os.O_WRONLY | os.O_TRUNC, CTX)
    (_, name, mode, flags, caller), = fs.called("create")
    assert (name, mode, flags, caller) == (b"new", 0o600, os.O_WRONLY | os.O_TRUNC,
                                           Caller(1001, 1002))
    assert info.fh >= FIRST_HANDLE and entry.st_ino > ROOT_INO
    assert not fs.called("keep_by_node")


async def test_opens_kept_by_the_kernel(monkeypatch, fs):
    """With files_by_inode, open answers ENOSYS unasked, create makes a read-write
    descriptor the node's, and reads and writes come by inode."""
    monkeypatch.setattr(features, "FEATURES", Features(files_by_inode=True))
    ops = FuseOps(fs, ListingSnapshots())
    assert ops.opens == "kernel"
    assert await _fuse_errno(ops.open, ROOT_INO, os.O_RDONLY, CTX) == errno.ENOSYS
    assert not fs.called("open")
    info, entry = await ops.create(ROOT_INO, b"new", 0o644, os.O_WRONLY, CTX)
    assert fs.called("create")[0][3] == os.O_RDWR and info.fh == 0
    assert len(fs.called("keep_by_node")) == 1
    assert await ops.read(entry.st_ino, 0, 5) == b"by node"
    assert await ops.write(entry.st_ino, 3, b"xyz") == 3
    assert fs.called("write_node") == [(fs.nodes[entry.st_ino], 3, b"xyz")]


async def test_setattr_passes_only_the_fields_asked(fs, ops):
    attr = pyfuse3.EntryAttributes()
    attr.st_mode, attr.st_uid, attr.st_gid = stat.S_IFREG | 0o700, 5, 6
    attr.st_size, attr.st_atime_ns, attr.st_mtime_ns = 123, 111, 222
    asked = dict(update_mode=False, update_uid=False, update_gid=False, update_size=False,
                 update_atime=False, update_mtime=False)
    await ops.setattr(ROOT_INO, attr, types.SimpleNamespace(**asked), None, CTX)
    assert fs.called("setattr") == [(fs.root, SetAttr(), None)]
    fh = (await ops.open(ROOT_INO, os.O_RDWR, CTX)).fh
    fields = types.SimpleNamespace(**dict(asked, update_mode=True, update_size=True,
                                          update_mtime=True))
    entry = await ops.setattr(ROOT_INO, attr, fields, fh, CTX)
    _, changes, handle = fs.called("setattr")[1]
    assert changes == SetAttr(mode=stat.S_IFREG | 0o700, size=123, mtime_ns=222)
    assert handle is fs.handles[fh] and entry.st_ino == ROOT_INO
    every = types.SimpleNamespace(**{k: True for k in asked})
    await ops.setattr(ROOT_INO, attr, every, None, CTX)
    assert fs.called("setattr")[2][1] == SetAttr(stat.S_IFREG | 0o700, 5, 6, 123, 111, 222)


async def test_rename_passes_both_names_and_the_flags(fs, ops):
    sub = fs.add(fs.root, b"sub", stat.S_IFDIR)
    await ops.rename(ROOT_INO, b"a", sub.ino, b"b", 1, CTX)  # RENAME_NOREPLACE
    assert fs.called("rename") == [(fs.root, b"a", sub, b"b", 1)]


async def test_flush_is_never_asked_again(fs, ops):
    assert await _fuse_errno(ops.flush, FIRST_HANDLE) == errno.ENOSYS
    assert fs.calls == []


async def test_without_xattrs_every_xattr_request_is_enosys_unasked(fs):
    ops = FuseOps(fs, ListingSnapshots(), xattrs=False)
    for handler, args in [(ops.getxattr, (ROOT_INO, b"user.a", CTX)),
                          (ops.listxattr, (ROOT_INO, CTX)),
                          (ops.setxattr, (ROOT_INO, b"user.a", b"v", CTX)),
                          (ops.removexattr, (ROOT_INO, b"user.a", CTX))]:
        assert await _fuse_errno(handler, *args) == errno.ENOSYS
    assert fs.calls == []
    assert await FuseOps(fs, ListingSnapshots()).getxattr(ROOT_INO, b"user.a", CTX) == b"value"


async def test_the_adapter_changes_nothing_of_the_model(fs, ops):
    """The daemon gives the model its notifier; the adapter only calls the model."""
    assert fs.notify is None