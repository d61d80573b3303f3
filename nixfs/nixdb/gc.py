"""``nixfs gc``: free dead upper paths in time that grows with the upper only.

Nix's collector walks every store entry, lower ones included.  But a lower path
never refers to an upper one, so which upper paths are alive follows from the GC
roots and the references among upper paths alone:

1. the roots, as Nix finds them (``nix-store --gc --print-roots``: links, profiles,
   temporary roots of running processes);
2. the upper paths: the upper's ``store/`` entries that are valid;
3. what is reachable from the roots within them (references, and derivers, as
   Nix keeps derivations by default);
4. the rest goes through ``nix-store --delete``, so Nix itself checks liveness
   again, takes its locks and updates its database.
"""

import os
import re
import subprocess

from .merged import open_db
from .schema import STORE_DIR
from .upperstore import UpperStore

_ALIVE = re.compile(r"Cannot delete path '([^']+)' since it is still alive")


class GcError(Exception):
    pass


def nix_store_args(mountpoint: str) -> list[str]:
    parent, base = os.path.split(mountpoint)
    if mountpoint == "/nix":
        return []
    if base == "nix":
        return ["--store", f"local?root={parent}"]
    return ["--store", f"local?store=/nix/store&real={mountpoint}/store"
                       f"&state={mountpoint}/var/nix&log={mountpoint}/var/log/nix"]


def _nix_store(mountpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nix-store", *nix_store_args(mountpoint), *args],
                          capture_output=True, text=True)


def roots(mountpoint: str) -> set[str]:
    proc = _nix_store(mountpoint, "--gc", "--print-roots")
    if proc.returncode != 0:
        raise GcError(f"nix-store --gc --print-roots failed: {proc.stderr.strip()}")
    out = set()
    for line in proc.stdout.splitlines():
        target = line.rsplit(" -> ", 1)[-1].strip()
        if target.startswith(STORE_DIR + "/"):
            out.add(target)
    return out


def dead_upper_paths(mountpoint: str, upper: str) -> tuple[list[str], int]:
    """(dead upper paths, number of valid upper paths), reading through the mount."""
    root_set = roots(mountpoint)
    store = UpperStore(upper)
    try:
        names = [n for n in os.listdir(store.path) if not n.startswith(".")]
    except FileNotFoundError:
        names = []
    conn = open_db(os.path.join(mountpoint, "var/nix/db/db.sqlite"))
    try:
        valid = {}
        for name in names:
            path = f"{STORE_DIR}/{name}"
            row = conn.execute("select id, deriver from ValidPaths where path = ?",
                               (path,)).fetchone()
            if row and store.has(name.encode()):
                valid[path] = row
        live: set[str] = set()
        todo = [p for p in root_set if p in valid]
        while todo:
            p = todo.pop()
            if p in live:
                continue
            live.add(p)
            pid, deriver = valid[p]
            for (ref,) in conn.execute("select v.path from Refs r join ValidPaths v on "
                                       "v.id = r.reference where r.referrer = ?", (pid,)):
                if ref in valid and ref not in live:
                    todo.append(ref)
            if deriver in valid and deriver not in live:
                todo.append(deriver)
    finally:
        conn.close()
    dead = sorted(p for p in valid if p not in live and not p.endswith("-nixfs-lower-roots"))
    return dead, len(valid)


def collect(mountpoint: str, upper: str, *, dry_run: bool = False) -> tuple[list[str], int]:
    """Delete dead upper paths through Nix; returns (deleted, valid upper paths before)."""
    dead, total = dead_upper_paths(mountpoint, upper)
    deleted = []
    while dead and not dry_run:
        proc = _nix_store(mountpoint, "--delete", *dead)
        if proc.returncode == 0:
            deleted.extend(dead)
            break
        alive = set(_ALIVE.findall(proc.stderr))
        if not alive:
            raise GcError(f"nix-store --delete failed: {proc.stderr.strip()}")
        dead = [p for p in dead if p not in alive]  # Nix knows better: keep them
    return (dead if dry_run else deleted), total
