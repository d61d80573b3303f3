"""A fresh upper's walk over a published generation, on a lower that counts its calls
(scripts/slowfs, the stand-in for NFS): the walk shows exactly what the lower holds, and
the catalog it is answered from is read in a few large reads, not once per listing."""

import collections
import json
import os
import sqlite3

from harness import NixfsMount, run_nixfs
from nixfs.nixdb import gcroot
from nixstore import generate_db
from relharness import SlowFs

CATALOG = "nix/var/nixfs/generations/1/listings.sqlite"


def bench_like_store(nix_dir, count: int) -> None:
    """*count* store paths laid out as scripts/bench's (29 entries each: bin/, lib/ with a
    symlink, share/doc, share/man/man1): listings larger than SQLite keeps in a page."""
    for i, path in enumerate(generate_db(nix_dir / "var/nix/db/db.sqlite", count, refs=2,
                                         store_dirs=nix_dir / "store")):
        top = nix_dir / "store" / os.path.basename(path)
        for sub in ("bin", "lib", "share/doc", "share/man/man1"):
            (top / sub).mkdir(parents=True, exist_ok=True)
        for j in range(3):
            (top / f"bin/prog{j}").write_text(f"#!/bin/sh\necho {i} {j}\n")
        for j in range(10):
            (top / f"lib/lib{j}.so").write_bytes(bytes(100 + j))
        for j in range(4):
            (top / f"share/doc/README{j}").write_text(f"doc {i} {j}\n")
            (top / f"share/man/man1/prog{j}.1").write_text(f".TH prog{j}\n")
        os.symlink("lib0.so", top / "lib/libmain.so")


def tree(top) -> dict:
    """Every entry below *top*: its type and permission bits, size (not of directories)
    and symlink target: what `find -ls` shows of a store but times and owners."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            target = os.readlink(path) if os.path.islink(path) else None
            out[os.path.relpath(path, top)] = (st.st_mode, None if os.path.isdir(path)
                                               else st.st_size, target)
    return out


def published(tmp_path, lower):
    """``nixfs publish`` of the store at *lower*; a fresh upper and a mount point for it."""
    proc = run_nixfs("publish", lower)
    assert proc.returncode == 0, proc.stderr
    upper, mnt = tmp_path / "upper", tmp_path / "M/nix"
    upper.mkdir()
    mnt.mkdir(parents=True)
    return upper, mnt


def test_a_fresh_uppers_walk_reads_the_catalog_in_chunks(tmp_path):
    lower = tmp_path / "L/nix"
    bench_like_store(lower, 120)
    upper, mnt = published(tmp_path, lower)
    with SlowFs(lower.parent, tmp_path / "slow", trace=tmp_path / "trace") as slow:
        with NixfsMount(slow.mnt / "nix", upper, mnt):
            shown = tree(mnt / "store")
            cache = json.loads(run_nixfs("status", "--json", mnt).stdout)["cache"]
        calls = slow.calls()
    db = sqlite3.connect(f"file:{lower}/var/nix/db/db.sqlite?mode=ro", uri=True)
    valid = {os.path.basename(p) for (p,) in db.execute("select path from ValidPaths")}
    db.close()
    root = os.path.basename(gcroot.root_path())  # nixfs' GC root, an upper path
    assert {rel.split("/", 1)[0] for rel in shown} == valid | {root}
    assert {rel: e for rel, e in shown.items() if rel.split("/", 1)[0] != root} == \
        tree(lower / "store")
    print(cache)
    assert cache["misses"] == 0 and cache["loaded_from_disk"] == 120 * 7  # all from the catalog
    # The catalog is read a store path's tree at a time, read ahead four paths to a query
    # (a worker trip each): a query per directory was 840 and more.
    assert cache["store_queries"] <= 120 // 2, cache
    catalog_calls = [kind for kind, path in calls if path == CATALOG]
    # About 12 chunks of 128 KiB: a read and its attribute check each (slowfs keeps no
    # attributes), where SQLite alone reads most listings' overflow pages one by one.
    assert len(catalog_calls) < 100, (len(catalog_calls), len(shown))


def test_mounting_over_a_generation_walks_to_its_files_once_per_process(tmp_path):
    """A mount opens its generation's files and the lower's database a dozen times and
    more (checks, the copy-on-write files, their connections, the follower's polls): the
    directories holding them are kept open, so a lower that caches no names (slowfs, NFS)
    is asked to look them up about once per process (the mount command, the daemon, its
    worker), not at every open (before: 15 lookups of the generation's directory, 12 of
    var/nix/db)."""
    lower = tmp_path / "L/nix"
    bench_like_store(lower, 20)
    upper, mnt = published(tmp_path, lower)
    with SlowFs(lower.parent, tmp_path / "slow", trace=tmp_path / "trace") as slow:
        with NixfsMount(slow.mnt / "nix", upper, mnt):
            calls = slow.calls()
            os.listdir(mnt / "store")
    lookups = collections.Counter(path for kind, path in calls if kind == "lookup")
    generation = os.path.dirname(CATALOG)
    print({path: lookups[path] for path in (generation, "nix/var/nix/db", "nix/var")})
    assert lookups[generation] <= 6 and lookups["nix/var/nix/db"] <= 4
