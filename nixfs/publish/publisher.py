"""``nixfs publish STORE``: one new generation, its manifest renamed into place last.

The publisher holds the generations' lock, takes the next number, writes the
files (whole, or as COW files over the newest generation when one can serve as
base), then seals the manifest: until that rename the new directory is just an
incomplete one that every reader ignores, so a publish that dies anywhere
leaves the previous generation current.  Incomplete directories older than the
new one (a publisher that died) are removed once it is complete.

A lower that has not changed since the newest generation gets no new one.
"""

import logging
import os
import shutil
import time
from dataclasses import dataclass, field


from ..nixdb.files import is_nix_store
from ..nixdb.schema import STORE_DIR, read_schema_version
from ..nixdb.snapshot import read_consistent
from ..usage import UsageError
from ..cow.cowmap import CowError
from . import incremental, manifest, whole
from .clock import Clock
from .generations import Generations

log = logging.getLogger(__name__)


@dataclass
class Published:
    number: int          # the generation now newest
    new: bool            # False: the lower had not changed, nothing was written
    manifest: dict
    seconds: float
    phases: dict = field(default_factory=dict)  # phase -> [wall s, CPU s] (clock.Clock)


def check_store(store: str) -> str:
    """The canonical store directory; UsageError unless it is a Nix store whose
    state directory this process may write into."""
    store = os.path.realpath(store)
    if not is_nix_store(store):
        raise UsageError(f"{store} holds no Nix store (store/ and var/nix/db/db.sqlite)")
    top = os.path.join(store, "var/nixfs")
    probe = top if os.path.exists(top) else os.path.join(store, "var")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{probe}: permission denied (nixfs publish writes generations "
                         "into STORE/var/nixfs)")
    return store


def publish(store: str, *, force: bool = False, full: bool = False) -> Published:
    """Publish a new generation of *store* if its lower changed (or *force*); *full*:
    written whole, never over the newest."""
    t0, clock = time.monotonic(), Clock()
    store = check_store(store)
    gens = Generations(store)
    lower_db = os.path.join(store, "var/nix/db/db.sqlite")
    schema = read_schema_version(os.path.dirname(lower_db))
    with gens.locked():
        newest = gens.newest()
        if newest is not None and full and not force:
            current = _current(gens, newest, lower_db)
            if current is not None:
                return Published(newest, False, current, time.monotonic() - t0)
        number = gens.make_next()
        try:
            try:
                body = None if full or newest is None else _over(gens, number, newest, force,
                                                                    clock)
            except incremental.Unchanged:
                shutil.rmtree(gens.dir(number))
                latest = manifest.load(gens.manifest(newest))
                return Published(newest, False, latest, time.monotonic() - t0)
            if body is None:
                body = whole.write(gens, number, lower_db, schema, clock)
            seal_files(gens, number)
            gens.note_given(number)
            sealed = manifest.write(gens.dir(number), {
                "format": manifest.FORMAT, "generation": number, "created": time.time(),
                "store_dir": STORE_DIR, **body})
        except BaseException:
            shutil.rmtree(gens.dir(number), ignore_errors=True)
            raise
        clock.lap("seal")
        remove_incomplete(gens, below=number)
    return Published(number, True, sealed, time.monotonic() - t0, clock.phases)


def seal_files(gens: Generations, number: int) -> None:
    """A generation's files are never written again: read-only for everyone (a client
    that opened one for writing would change it under every other client)."""
    for name in os.listdir(gens.dir(number)):
        os.chmod(os.path.join(gens.dir(number), name), 0o444)


def _over(gens: Generations, number: int, base: int, force: bool,
          clock: Clock) -> dict | None:
    """Generation *number* as COW files over *base*, or None (its directory emptied)
    where it is to be written whole; Unchanged if the lower is as it was."""
    try:
        return incremental.write(gens, number, base, manifest.load(gens.manifest(base)),
                                 force=force, clock=clock)
    except (incremental.NotIncremental, manifest.ManifestError, CowError) as e:
        log.info("writing generation %d whole: %s", number, e)
    for name in os.listdir(gens.dir(number)):
        os.unlink(os.path.join(gens.dir(number), name))
    return None


def _current(gens: Generations, newest: int, lower_db: str) -> dict | None:
    """The newest generation's manifest if the lower is still as it was then."""
    try:
        latest = manifest.load(gens.manifest(newest))
    except manifest.ManifestError as e:
        log.warning("generation %d is unusable (%s): publishing a new one", newest, e)
        return None
    facts = latest["lower_db"]

    def read(conn, snap):
        max_id, count = conn.execute(
            "select coalesce(max(id), 0), count(*) from ValidPaths").fetchone()
        row = conn.execute("select path from ValidPaths where id = ?", (max_id,)).fetchone()
        return max_id, count, row[0] if row else None, manifest.ca_facts(conn)

    live = read_consistent(lower_db, read)
    same = live == (facts["max_id"], facts["count"], facts["max_id_path"], facts.get("ca", {}))
    return latest if same else None


def remove_incomplete(gens: Generations, *, below: int) -> list[int]:
    """Remove the directories without a manifest numbered below *below* (their
    publisher died: the lock is held by whoever calls this)."""
    gone = []
    for n in gens.numbers():
        if n < below and not os.path.exists(gens.manifest(n)):
            shutil.rmtree(gens.dir(n), ignore_errors=True)
            gone.append(n)
    return gone

