"""A generation's manifest: what it holds, how to check it, and the lower it was cut from.

The manifest is the generation's commit point (renamed into place last) and the
only thing a client reads in full before using it, so it carries everything a
cheap check needs: each file's sizes and hashes (the content's sha256, and for a
copy-on-write file its map's), its base, and facts about the lower database
(max id and the path there, an id sample) that tell a live lower that merely
changed from a foreign one, and the name of the lower database's state the
generation was read in (``state``, from ``nixdb.dbstate``; None, or absent in a
manifest of an older nixfs: a client then counts the live lower's rows).  Its own sha256 is over its canonical JSON without
that key (sorted keys, no spaces), so a tampered or truncated manifest fails.
"""

import hashlib
import json
import os

from ..nixdb.lowerindex import CA_FOLLOWED
from ..cow.cowmap import fsync_path
from .generations import MANIFEST

FORMAT = 1
SAMPLE_STEP = 1000  # the id sample: the rows whose id is a multiple of this
# What a file entry's sha256 is of (the field sha256_kind): a whole file's content, or
# a COW file's identity (incremental.identity_sha256: its map and its delta's pages).
CONTENT, COW_IDENTITY = "content", "cow-identity"


class ManifestError(Exception):
    """A manifest that cannot be used: unreadable, malformed, or its hash does not match."""


def canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def self_hash(manifest: dict) -> str:
    return hashlib.sha256(canonical(manifest)).hexdigest()


def write(gen_dir: str, manifest: dict) -> dict:
    """Seal *manifest* with its hash and rename it into *gen_dir* (durably): the
    generation is complete from then on."""
    manifest = dict(manifest, sha256=self_hash(manifest))
    tmp = os.path.join(gen_dir, MANIFEST + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.rename(tmp, os.path.join(gen_dir, MANIFEST))
    fsync_path(gen_dir)
    return manifest


def load(path: str) -> dict:
    """The manifest at *path*, its hash and format checked; ManifestError if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 20)
        manifest = json.loads(data)
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing") from None
    except (OSError, ValueError, UnicodeError) as e:
        raise ManifestError(f"{path} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a format {FORMAT} manifest")
    if manifest.get("sha256") != self_hash(manifest):
        raise ManifestError(f"{path}: its sha256 does not match its content")
    for key in ("generation", "created", "store_dir", "lower_db", "files", "depth"):
        if key not in manifest:
            raise ManifestError(f"{path}: no {key!r}")
    return manifest


def file_sha256(path: str) -> str:
    """The sha256 of a plain file's content."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: str, *, size: int, sha256: str, base: str | None = None,
               map_sha256: str | None = None) -> dict:
    """A ``files`` entry: logical *size*, the delta's size on disk, the map and base."""
    return {"size": size, "delta_size": os.stat(path).st_size, "map_sha256": map_sha256,
            "base": base, "sha256": sha256, "sha256_kind": CONTENT}


def lower_facts(conn, schema: int, *, below: int) -> dict:
    """The ``lower_db`` entry from a connection on a generation's database (the lower
    rows are those with ids *below* the GC root's): max id and the path there,
    count, the id sample with its hash, and each ca table's max id and count."""
    max_id, count = conn.execute("select coalesce(max(id), 0), count(*) from ValidPaths "
                                 "where id < ?", (below,)).fetchone()
    row = conn.execute("select path from ValidPaths where id = ?", (max_id,)).fetchone()
    sample = []
    for i in range(SAMPLE_STEP, max_id + 1, SAMPLE_STEP):  # lookups by id: no scan
        found = conn.execute("select path from ValidPaths where id = ?", (i,)).fetchone()
        if found:
            sample.append([i, found[0]])
    return {"max_id": max_id, "count": count, "schema": schema,
            "max_id_path": row[0] if row else None,
            "id_sample_sha256": sample_sha256(sample), "id_sample": sample,
            "ca": ca_facts(conn)}


def ca_facts(conn) -> dict:
    """Max id and count of each ca table nixfs follows that the database has."""
    out = {}
    for table in CA_FOLLOWED:
        if conn.execute("select 1 from sqlite_master where type = 'table' and name = ?",
                        (table,)).fetchone():
            out[table] = list(conn.execute(f"select coalesce(max(id), 0), count(*) "
                                           f"from {table}").fetchone())
    return out


def sample_sha256(sample) -> str:
    """The design's hash of an id sample: sha256 over "id path\\n" of each row."""
    h = hashlib.sha256()
    for i, path in sample:
        h.update(f"{i} {path}\n".encode())
    return h.hexdigest()
