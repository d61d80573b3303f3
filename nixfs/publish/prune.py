"""``nixfs publish --list`` and ``--keep N``: what generations there are, and pruning them.

Pruning keeps the newest N complete generations and every generation their
chains of bases need (a COW file is nothing without its base), and removes the
rest, as well as incomplete directories older than the newest complete one
(what a publisher that died left).  It runs under the publishers' lock.  A
client that has a removed generation open keeps reading it (an open file
outlives its name); its next mount rebases onto a newer one.
"""

import os
import shutil
import time

from . import manifest as manifest_file
from ..cow.cowmap import map_name
from .generations import FILES, Generations


def describe(gens: Generations, number: int) -> dict:
    """One line of ``--list``: number, state, time, paths, bytes on disk, base, depth."""
    size = 0
    for name in os.listdir(gens.dir(number)) if os.path.isdir(gens.dir(number)) else ():
        try:
            size += os.lstat(gens.file(number, name)).st_blocks * 512
        except FileNotFoundError:
            pass
    row = {"generation": number, "state": "incomplete", "created": None, "paths": None,
           "bytes": size, "base": None, "depth": None}
    if not os.path.exists(gens.manifest(number)):
        return row
    try:
        m = manifest_file.load(gens.manifest(number))
    except manifest_file.ManifestError as e:
        return dict(row, state=f"damaged: {e}")
    base = m["files"][FILES[0]]["base"]
    return dict(row, state="complete", created=m["created"], paths=m["lower_db"]["count"],
                base=int(base.split("/")[3]) if base else None, depth=m["depth"])


def listing(store: str) -> list[dict]:
    gens = Generations(store)
    return [describe(gens, n) for n in gens.numbers()]


def render(rows: list[dict]) -> str:
    lines = [f"{'GEN':>5}  {'CREATED (UTC)':19}  {'PATHS':>9}  {'SIZE':>10}  {'BASE':>5}  STATE"]
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created"])) \
            if r["created"] else "-"
        paths = "-" if r["paths"] is None else str(r["paths"])
        base = "-" if r["base"] is None else str(r["base"])
        lines.append(f"{r['generation']:>5}  {created:19}  {paths:>9}  "
                     f"{_human(r['bytes']):>10}  {base:>5}  {r['state']}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def needed_by(gens: Generations, number: int) -> set[int]:
    """*number* and every base its chain needs (as far as the manifests say)."""
    out, current = set(), number
    while current is not None and current not in out:
        out.add(current)
        try:
            m = manifest_file.load(gens.manifest(current))
        except manifest_file.ManifestError:
            break
        base = m["files"][FILES[0]]["base"]
        current = int(base.split("/")[3]) if base else None
    return out


def keep(store: str, count: int) -> list[int]:
    """Keep the newest *count* complete generations (and their bases); the numbers
    removed.  The caller holds the lock."""
    gens = Generations(store)
    complete = gens.complete()
    kept: set[int] = set()
    for number in complete[-count:] if count > 0 else []:
        kept |= needed_by(gens, number)
    newest = complete[-1] if complete else None
    removed = []
    for number in gens.numbers():
        incomplete = not os.path.exists(gens.manifest(number))
        if number in kept or (incomplete and (newest is None or number > newest)):
            continue
        _remove(gens, number)
        removed.append(number)
    return removed


def _remove(gens: Generations, number: int) -> None:
    """The manifest first: a half-removed generation is an incomplete one."""
    try:
        os.unlink(gens.manifest(number))
    except FileNotFoundError:
        pass
    for name in FILES:
        for path in (gens.file(number, name), gens.file(number, map_name(name))):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    shutil.rmtree(gens.dir(number), ignore_errors=True)
