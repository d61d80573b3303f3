"""A published generation of a Nix-built store against what a first mount learns, and Nix."""

import os
import shutil
import stat

import apsw
from nixfs.nixdb import gcroot
from nixfs.overlay.dircache import decode, decode_xattrs
from nixfs.overlay.liststore import ListingStore
from nixfs.publish.publisher import publish
from nixfs.publish.verify import find_usable
from nixlower import LOWER_DRVS, Store, built_lower  # noqa: F401 (fixture)
from nixstore import nix, nix_build


def _rows(path: str, sql: str) -> list:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _without_atimes(data: bytes):
    listing = decode(data)
    return {n: st._replace(st_atime_ns=0) for n, st in listing.stats()}, listing.targets


def _walk_with_xattrs(root) -> int:
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            os.listxattr(p, follow_symlinks=False)
            if stat.S_ISLNK(os.lstat(p).st_mode):
                os.readlink(p)
            seen += 1
    return seen


def test_a_generation_holds_what_a_first_mount_learns(tmp_path, built_lower):
    s = Store(tmp_path, built_lower)
    bb = next((s.lower / "store").glob("*-busybox"))
    os.setxattr(bb, "user.nixfs-test", b"on the store path")
    done = publish(str(s.lower))
    gen = find_usable(str(s.lower))
    assert gen.number == done.number == 1
    with s.mount("xattr=on", "generation=off"):  # a first build that learns as before
        assert _walk_with_xattrs(s.mnt / "store") > 10
        assert os.getxattr(s.mnt / "store" / bb.name, "user.nixfs-test") == b"on the store path"
    learnt = dict(_rows(str(s.upper / ".nixfs/listings.sqlite"), "select key, data from listings"))
    published = ListingStore(gen.catalog)
    try:
        assert len(learnt) > 10
        for key, data in learnt.items():
            if key.endswith(b"\0xattrs"):
                assert published.get_xattrs(key[:-len(b"\0xattrs")]) == decode_xattrs(data), key
            else:
                ours = published.conn.execute("select data from listings where key = ?",
                                              (key,)).fetchone()
                assert ours and _without_atimes(ours[0]) == _without_atimes(data), key
    finally:
        published.close()
    assert _rows(gen.index, "select * from paths order by name") == \
        _rows(str(s.upper / ".nixfs/lower-index.sqlite"), "select * from paths order by name")


def test_nix_reads_the_generations_database(tmp_path, built_lower):
    s = Store(tmp_path, built_lower)
    publish(str(s.lower))
    gen = find_usable(str(s.lower))
    reader = tmp_path / "R"
    (reader / "nix/store").mkdir(parents=True)
    shutil.copytree(s.lower / "var/nix/db", reader / "nix/var/nix/db")
    shutil.copy(gen.db, reader / "nix/var/nix/db/db.sqlite")
    for suffix in ("-wal", "-shm"):
        (reader / "nix/var/nix/db" / f"db.sqlite{suffix}").unlink(missing_ok=True)
    lower_paths = sorted(p for (p,) in _rows(str(s.lower / "var/nix/db/db.sqlite"),
                                             "select path from ValidPaths"))
    refs = nix(reader, "nix-store", "-q", "--references", gcroot.root_path()).stdout.split()
    assert sorted(refs) == lower_paths
    nix(reader, "nix-store", "--check-validity", *lower_paths)
    for name, out in s.paths.items():
        assert sorted(nix(reader, "nix-store", "-q", "--references", out).stdout.split()) == \
            sorted(nix(s.lower_root, "nix-store", "-q", "--references", out).stdout.split())


def _logical_copy(gen, name: str, dest) -> None:
    """A COW generation file's content as a plain file (for a Nix to read)."""
    from nixfs.cow.bases import base_opener
    f = base_opener(gen.store)(os.path.relpath(gen.files[name], gen.store))
    try:
        with open(dest, "wb") as out:
            out.write(f.pread(f.size(), 0))
    finally:
        f.close()


def test_an_incremental_generation_after_nix_adds_and_deletes_paths(tmp_path, built_lower):
    s = Store(tmp_path, built_lower)
    publish(str(s.lower))
    added = nix_build(s.lower_root, s.expr({"extra": ["liba"]}), "extra")[0]
    nix(s.lower_root, "nix-store", "--delete", s.paths["app"])
    assert s.lower_valid(added) and not s.lower_valid(s.paths["app"])
    done = publish(str(s.lower))
    gen = find_usable(str(s.lower))
    assert gen.number == done.number == 2 and gen.chain == (2, 1)
    reader = tmp_path / "R"
    (reader / "nix/store").mkdir(parents=True)
    shutil.copytree(s.lower / "var/nix/db", reader / "nix/var/nix/db")
    _logical_copy(gen, "db.sqlite", reader / "nix/var/nix/db/db.sqlite")
    for suffix in ("-wal", "-shm"):
        (reader / "nix/var/nix/db" / f"db.sqlite{suffix}").unlink(missing_ok=True)
    lower_paths = sorted(p for (p,) in _rows(str(s.lower / "var/nix/db/db.sqlite"),
                                             "select path from ValidPaths"))
    assert added in lower_paths and s.paths["app"] not in lower_paths
    refs = nix(reader, "nix-store", "-q", "--references", gcroot.root_path()).stdout.split()
    assert sorted(refs) == lower_paths
    nix(reader, "nix-store", "--check-validity", *lower_paths)
    assert nix(reader, "nix-store", "--check-validity", s.paths["app"], check=False).returncode
    assert sorted(nix(reader, "nix-store", "-q", "--references", added).stdout.split()) == \
        sorted(nix(s.lower_root, "nix-store", "-q", "--references", added).stdout.split())
