"""Finding the newest generation a client may use, checked cheaply against the live lower.

A client calls ``find_usable`` before each mount of a fresh (or rebasing) upper.
The check reads no generation file in full: the manifest's own hash, each file's
size on disk, each COW map's hash, the chain of bases (each verified alike), and
the live lower database (read lock-free, a few hundred lookups): the row at the
generation's max id must still be that path (or gone, with the lower's id
sequence past it), and every sampled row still there must hold the same path.
Rows deleted since are fine (the client follows them live); a different path
at a known id means another store, and the generation is refused.  A live lower
still in the very state the generation was read in (the manifest's ``state``,
``nixdb.dbstate``) needs none of those lookups.
"""

import hashlib
import logging
import os
from dataclasses import dataclass

from ..nixdb import dbstate
from ..nixdb.schema import STORE_DIR, SchemaError, read_schema_version
from ..nixdb.snapshot import SnapshotError, read_consistent
from . import manifest as manifest_file
from ..cow.cowmap import map_name
from .generations import CATALOG, DB, FILES, INDEX, MANIFEST, Generations

log = logging.getLogger(__name__)

MAX_DEPTH = 64  # a chain longer than this is damage, not a chain


class GenerationError(Exception):
    """A generation that must not be used (one line: why)."""


@dataclass(frozen=True)
class Generation:
    """A verified generation: where its files are and what lower it holds."""
    store: str                  # the store directory (holding store/, var/nix, var/nixfs)
    number: int
    dir: str                    # STORE/var/nixfs/generations/N
    manifest: dict              # the parsed manifest
    manifest_sha256: str        # its self-hash: what a client records it is based on
    files: dict                 # name -> absolute path (db.sqlite, lower-index.sqlite, listings.sqlite)
    maps: dict                  # name -> absolute path of its COW map, or None (a plain file)
    chain: tuple                # this generation's number and its bases', newest first
    max_id: int                 # the lower's max ValidPaths id it holds
    count: int                  # the lower rows it holds
    rows_deleted: bool          # sampled rows the live lower no longer has (followed live)

    @property
    def db(self) -> str:
        return self.files[DB]

    @property
    def index(self) -> str:
        return self.files[INDEX]

    @property
    def catalog(self) -> str:
        return self.files[CATALOG]


def find_usable(store: str, lower_db: str | None = None) -> Generation | None:
    """The newest complete generation of *store* that verifies against the live
    lower database (default ``STORE/var/nix/db/db.sqlite``), or None.  An unusable
    newer generation is named in one warning line."""
    gens = Generations(store)
    refused = []
    for number in reversed(gens.complete()):
        try:
            found = verify(store, number, lower_db)
        except GenerationError as e:
            refused.append(f"generation {number}: {e}")
            continue
        if refused:
            log.warning("not using %s; using generation %d", "; ".join(refused), number)
        return found
    if refused:
        log.warning("no usable published generation (%s)", "; ".join(refused[:3]))
    return None


def verify(store: str, number: int, lower_db: str | None = None, *,
           deep: bool = False) -> Generation:
    """Generation *number* of *store*, checked; GenerationError saying why not.  *deep*
    also hashes every file of its chain again (a full read: for an admin's check, not
    for a mount)."""
    lower_db = lower_db or os.path.join(store, "var/nix/db/db.sqlite")
    gens = Generations(store)
    manifest, chain = _verify_chain(gens, number)
    if deep:
        for n in chain:
            _deep_check(gens, n)
    facts = manifest["lower_db"]
    try:
        schema = read_schema_version(os.path.dirname(lower_db))
    except SchemaError as e:
        raise GenerationError(str(e)) from None
    if schema != facts["schema"]:
        raise GenerationError(f"it holds schema {facts['schema']}, the live lower {schema}")
    deleted = check_lower(facts, lower_db)
    files = {n: gens.file(number, n) for n in FILES}
    maps = {n: (gens.file(number, map_name(n)) if manifest["files"][n]["map_sha256"] else None)
            for n in FILES}
    return Generation(store=store, number=number, dir=gens.dir(number), manifest=manifest,
                      manifest_sha256=manifest["sha256"], files=files, maps=maps,
                      chain=tuple(chain), max_id=facts["max_id"], count=facts["count"],
                      rows_deleted=deleted)


def _verify_chain(gens: Generations, number: int) -> tuple[dict, list[int]]:
    """The manifest of *number* and its chain of bases, each one's files checked."""
    chain, manifests = [], []
    current = number
    while current is not None:
        if len(chain) > MAX_DEPTH or current in chain:
            raise GenerationError(f"the chain of bases from {number} loops or runs too deep")
        m = _checked_manifest(gens, current)
        chain.append(current)
        manifests.append(m)
        current = _base_of(gens, m)
    if manifests[0]["depth"] != len(chain) - 1:
        raise GenerationError(f"its depth is {manifests[0]['depth']}, its chain {chain}")
    return manifests[0], chain


def _checked_manifest(gens: Generations, number: int) -> dict:
    with gens.reached(number) as at:
        return _checked_manifest_at(gens, number, at)


def _checked_manifest_at(gens: Generations, number: int, at: str) -> dict:
    """``_checked_manifest``, its files read through *at* (their directory)."""
    try:
        m = manifest_file.load(os.path.join(at, MANIFEST))
    except manifest_file.ManifestError as e:
        raise GenerationError(str(e).replace(at, gens.dir(number))) from None
    if m["generation"] != number or m["store_dir"] != STORE_DIR:
        raise GenerationError(f"its manifest is of generation {m['generation']} in "
                              f"{m['store_dir']}")
    for name in FILES:
        entry = m["files"].get(name)
        if not isinstance(entry, dict):
            raise GenerationError(f"its manifest lists no {name}")
        _check_file(gens, number, name, entry, at)
    return m


def _check_file(gens: Generations, number: int, name: str, entry: dict, at: str) -> None:
    path = gens.file(number, name)
    try:
        size = os.stat(os.path.join(at, name)).st_size
    except OSError as e:
        raise GenerationError(f"{path}: {os.strerror(e.errno)}") from None
    if size != entry["delta_size"]:
        raise GenerationError(f"{path} holds {size} bytes, its manifest says "
                              f"{entry['delta_size']}")
    if entry["map_sha256"] is None:
        if entry["base"] is not None or size != entry["size"]:
            raise GenerationError(f"{path}: a plain file with a base or another size")
        return
    try:
        with open(os.path.join(at, map_name(name)), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise GenerationError(f"the COW map of {path}: {os.strerror(e.errno)}") from None
    if digest != entry["map_sha256"]:
        raise GenerationError(f"the COW map of {path} does not match its manifest")


def _deep_check(gens: Generations, number: int) -> None:
    """Every file's hash recomputed: a whole file's content, a COW file's identity."""
    from .incremental import identity_sha256
    m = manifest_file.load(gens.manifest(number))
    for name in FILES:
        entry, path = m["files"][name], gens.file(number, name)
        if entry.get("sha256_kind", manifest_file.CONTENT) == manifest_file.CONTENT:
            digest = manifest_file.file_sha256(path)
        else:
            with open(gens.file(number, map_name(name)), "rb") as f:
                digest = identity_sha256(path, f.read())
        if digest != entry["sha256"]:
            raise GenerationError(f"{path}: its content does not match its manifest")


def _base_of(gens: Generations, m: dict) -> int | None:
    """The generation the files of *m* are COW over (all the same one), or None."""
    bases = {m["files"][n]["base"] for n in FILES} - {None}
    if not bases:
        return None
    numbers = set()
    for base in bases:
        parts = base.split("/")
        if len(parts) != 5 or "/".join(parts[:3]) != "var/nixfs/generations" \
                or not parts[3].isdigit() or parts[4] not in FILES:
            raise GenerationError(f"a base outside the generations: {base}")
        numbers.add(int(parts[3]))
    if len(numbers) != 1 or min(numbers) >= m["generation"]:
        raise GenerationError(f"bases {sorted(bases)} of generation {m['generation']}")
    return numbers.pop()


def check_lower(facts: dict, lower_db: str) -> bool:
    """Whether the live lower still is the one *facts* describe (GenerationError if it
    is another store); True if sampled rows were deleted since."""

    def read(conn, snap):
        if dbstate.same(facts.get("state"), dbstate.of(snap)):
            return None  # the state the generation was read in: its rows, unchanged
        at_max = conn.execute("select path from ValidPaths where id = ?",
                              (facts["max_id"],)).fetchone()
        seq = conn.execute("select seq from sqlite_sequence where name = 'ValidPaths'"
                           ).fetchone() if _has_sequence(conn) else None
        live = {}
        for i, _ in facts["id_sample"]:
            row = conn.execute("select path from ValidPaths where id = ?", (i,)).fetchone()
            live[i] = row[0] if row else None
        return at_max[0] if at_max else None, seq[0] if seq else 0, live

    try:
        found = read_consistent(lower_db, read)
    except (SnapshotError, OSError) as e:
        raise GenerationError(f"the live lower database is unreadable: {e}") from None
    except Exception as e:  # apsw errors of a damaged database
        raise GenerationError(f"the live lower database: {e}") from None
    if found is None:
        return False
    at_max, seq, live = found
    if facts["max_id"]:
        if at_max is None and seq < facts["max_id"]:
            raise GenerationError("the live lower database never reached its max id: "
                                  "another store")
        if at_max is not None and at_max != facts["max_id_path"]:
            raise GenerationError(f"the live lower database holds {at_max} at id "
                                  f"{facts['max_id']}: another store")
    deleted = False
    for i, path in facts["id_sample"]:
        if live[i] is None:
            deleted = True
        elif live[i] != path:
            raise GenerationError(f"the live lower database holds {live[i]} at id {i}: "
                                  "another store")
    return deleted


def _has_sequence(conn) -> bool:
    return conn.execute("select 1 from sqlite_master where name = 'sqlite_sequence'"
                        ).fetchone() is not None
