"""Every Nix's database shape, carried by the first mount and followed live (synthetic dbs).

The shapes are in dbshapes.py; the client on the mount is the host's stock Nix 2.8
(which ignores tables and columns it does not know), and the merged database is also
read directly through the mount, as another Nix would read it.
"""

import json
import sqlite3
from contextlib import closing

import apsw
import pytest
from dbshapes import SHAPES, add_path, has_ca, make_store, migrate, provenance, realise
from harness import NixfsMount, run_nixfs, wait_until
from nixstore import fake_hash, nix


class ShapeStore:
    def __init__(self, tmp_path, shape):
        self.shape = shape
        self.lower = tmp_path / "L/nix"
        self.paths = make_store(self.lower, shape)
        self.db = self.lower / "var/nix/db/db.sqlite"
        self.upper = tmp_path / "upper"
        self.upper.mkdir()
        self.root = tmp_path / "M"
        self.mnt = self.root / "nix"
        self.mnt.mkdir(parents=True)

    def mount(self):
        return NixfsMount(self.lower, self.upper, self.mnt)

    def merged(self):
        """The merged database, read through the mount (as a Nix on it would)."""
        return sqlite3.connect(f"file:{self.mnt}/var/nix/db/db.sqlite?mode=ro", uri=True)

    def merged_realisations(self):
        with closing(self.merged()) as conn:
            return _realisations(conn)

    def lower_realisations(self):
        with closing(_lower(self)) as conn:
            return _realisations(conn)

    def valid(self, path) -> bool:
        return nix(self.root, "nix-store", "--check-validity", path, check=False).returncode == 0


def _rows(conn, table, order="path"):
    cols = [r[1] for r in conn.execute(f"pragma table_info({table})") if r[1] != "id"]
    return cols, conn.execute(f"select {', '.join(cols)} from {table} order by {order}").fetchall()


def _realisations(conn):
    """(drvPath, outputName, output store path, signatures) of either ca table."""
    tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
    out = set()
    if "Realisations" in tables:
        out |= set(conn.execute("select r.drvPath, r.outputName, v.path, r.signatures from "
                                "Realisations r join ValidPaths v on v.id = r.outputPath"))
    if "BuildTraceV3" in tables:
        out |= set(conn.execute("select drvPath, outputName, outputPath, signatures "
                                "from BuildTraceV3"))
    return out


def _lower(store):
    return sqlite3.connect(f"file:{store.db}?mode=ro", uri=True)



@pytest.fixture(params=SHAPES)
def store(request, tmp_path):
    return ShapeStore(tmp_path, request.param)


def test_first_mount_carries_every_row_and_column(store):
    lower = _lower(store)
    lower_cols, lower_rows = _rows(lower, "ValidPaths")
    lower_real = _realisations(lower)
    lower_migrations = set(lower.execute("select * from SchemaMigrations")) if \
        store.shape not in ("nix-2.8", "lix") else set()
    with store.mount():
        with closing(store.merged()) as merged:
            cols, rows = _rows(merged, "ValidPaths")
            real = _realisations(merged)
            migrations = set(merged.execute("select * from SchemaMigrations")) \
                if lower_migrations else set()
        assert cols == lower_cols
        rows = [r for r in rows if not r[0].endswith("-nixfs-lower-roots")]
        assert rows == lower_rows
        assert real == lower_real and (bool(lower_real) == has_ca(store.shape))
        assert migrations == lower_migrations
        # A stock Nix 2.8 on the mount: every lower path valid, its references there.
        assert store.valid(store.paths[-1])
        refs = nix(store.root, "nix-store", "-q", "--references", store.paths[-1]).stdout.split()
        assert set(refs) == {p for (p,) in lower.execute(
            "select v.path from Refs r join ValidPaths v on v.id = r.reference where "
            "r.referrer = (select id from ValidPaths where path = ?)", (store.paths[-1],))}


def test_live_paths_and_realisations_carry_every_column(store):
    writer = apsw.Connection(str(store.db))  # kept open, as nix-daemon keeps it
    writer.execute("pragma journal_mode=wal").fetchall()
    writer.execute("pragma wal_autocheckpoint=0").fetchall()
    try:
        with store.mount():
            new = add_path(store.db, store.shape, 1, refs=store.paths[:2], realised=True,
                           writer=writer)
            wait_until(lambda: store.valid(new), "a new lower path valid through the mount")
            with closing(store.merged()) as merged, closing(_lower(store)) as lower:
                assert [r for r in _rows(merged, "ValidPaths")[1] if r[0] == new] == [
                    r for r in _rows(lower, "ValidPaths")[1] if r[0] == new]
                if store.shape == "determinate":
                    assert merged.execute("select provenance from ValidPaths where path = ?",
                                          (new,)).fetchone() == (provenance(new),)
            if has_ca(store.shape):
                # The realisation came with its path: the same facts, the merged ids.
                wait_until(lambda: store.merged_realisations() == store.lower_realisations(),
                      "the realisation of a new lower path through the mount")
                assert any(r[2] == new for r in store.merged_realisations())
            # A realisation registered later for a path already there follows too.
            with writer:
                realise(writer, store.shape, "sha256:" + fake_hash(7, "late"), store.paths[2])
            if has_ca(store.shape):
                wait_until(lambda: store.merged_realisations() == store.lower_realisations(),
                      "a later realisation of a lower path through the mount")
            if has_ca(store.shape):
                # A realisation deleted on its own (its path stays) leaves the merged one too.
                table = "BuildTraceV3" if store.shape == "nix-2.35-ca" else "Realisations"
                with writer:
                    gone = writer.execute(f"select id, drvPath from {table} order by id "
                                          "limit 1").fetchone()
                    if table == "Realisations":
                        writer.execute("delete from RealisationsRefs where referrer = ? or "
                                       "realisationReference = ?", (gone[0], gone[0]))
                    writer.execute(f"delete from {table} where id = ?", (gone[0],))
                wait_until(lambda: gone[1] not in {r[0] for r in store.merged_realisations()},
                      "a deleted realisation gone through the mount")
                assert store.merged_realisations() == store.lower_realisations()
            # A lower path deleted takes its realisation along.
            with writer:
                writer.execute("delete from ValidPaths where path = ?", (new,))
            wait_until(lambda: not store.valid(new), "a deleted lower path invalid")
            assert store.merged_realisations() == store.lower_realisations()
    finally:
        writer.close()


def test_lower_migrated_while_mounted_is_followed(tmp_path):
    """The lower's Nix is upgraded while mounted: its migrations add a column and the
    ca tables; rows written in the new shape arrive whole, and the merged database
    records the migrations (so a Nix on the mount does not run them again)."""
    store = ShapeStore(tmp_path, "nix-2.8")
    with store.mount():
        conn = apsw.Connection(str(store.db))
        with conn:
            migrate(conn, "determinate")
            migrate(conn, "nix-2.35-ca")
        new = add_path(store.db, "nix-2.35-ca", 2, refs=store.paths[:1], realised=True)
        conn.close()
        wait_until(lambda: store.valid(new), "a path in the new shape valid through the mount")
        with closing(store.merged()) as merged:
            assert merged.execute("select provenance from ValidPaths where path = ?",
                                  (new,)).fetchone() == (provenance(new),)
            assert _realisations(merged) == store.lower_realisations() != set()
            assert {"20241024-provenance", "20251017-ca-derivations"} <= {
                m for (m,) in merged.execute("select migration from SchemaMigrations")}
    # The merged database stays usable by the Nix on the mount after a remount.
    with store.mount():
        assert store.valid(new) and store.valid(store.paths[0])


def test_client_migrations_through_the_mount_then_sync(tmp_path):
    """A newer Nix on the mount migrates the merged database (drops IndexReferrer, adds
    provenance and the ca tables, as Nix 2.35 and Determinate Nix do on open); nixfs
    keeps following the lower (of Nix 2.26's shape) after that."""
    store = ShapeStore(tmp_path, "nix-2.26")
    with store.mount():
        client = apsw.Connection(f"{store.mnt}/var/nix/db/db.sqlite")
        client.setbusytimeout(10_000)
        # The write lock first, then the changes: a deferred transaction that read the
        # schema before nixfs' worker committed would get SQLITE_BUSY at its first write
        # with no wait (Nix retries the whole transaction then; this client does not).
        client.execute("begin immediate")
        migrate(client, "nix-2.35-ca")
        migrate(client, "determinate")
        client.execute("update ValidPaths set provenance = 'mine' where path = ?",
                       (store.paths[0],))
        client.execute("commit")
        client.close()
        new = add_path(store.db, "nix-2.26", 3, refs=store.paths[:3])
        wait_until(lambda: store.valid(new), "a new lower path valid after the client's migrations")
        with closing(store.merged()) as merged:
            assert merged.execute("select provenance from ValidPaths where path = ?",
                                  (new,)).fetchone() == (None,)
            assert merged.execute("select provenance from ValidPaths where path = ?",
                                  (store.paths[0],)).fetchone() == ("mine",)
            assert merged.execute("select count(*) from sqlite_master where "
                                  "name = 'IndexReferrer'").fetchone() == (0,)
            assert merged.execute("pragma integrity_check").fetchone() == ("ok",)
        assert run_nixfs("sync", store.mnt).returncode == 0


def _refused_on_remount(store, change, words):
    """Mount once; *change* the lower while unmounted (it returns the path it added);
    the next mount must refuse with one line naming what cannot be carried, and leave
    the merged database as it was: not half of that change."""
    with store.mount():
        pass
    merged_db = store.upper / "var/nix/db/db.sqlite"
    before = sqlite3.connect(merged_db).execute("select * from ValidPaths").fetchall()
    conn = apsw.Connection(str(store.db))
    new = change(conn)
    conn.close()
    proc = run_nixfs("mount", "--lower", store.lower, "--upper", store.upper, store.mnt)
    if proc.returncode == 0:
        run_nixfs("umount", store.mnt)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr
    db = sqlite3.connect(merged_db)
    assert db.execute("select * from ValidPaths").fetchall() == before
    assert db.execute("select 1 from ValidPaths where path = ?", (new,)).fetchone() is None


def test_an_unknown_lower_table_is_refused(tmp_path):
    store = ShapeStore(tmp_path, "nix-2.26")

    def change(conn):
        conn.execute("create table FutureThings (id integer primary key, path text)")
        return add_path(store.db, "nix-2.26", 4, refs=store.paths[:1], writer=conn)
    _refused_on_remount(store, change, ["FutureThings"])


def test_a_first_mount_of_an_unknown_table_is_refused(tmp_path):
    store = ShapeStore(tmp_path, "nix-2.8")
    conn = apsw.Connection(str(store.db))
    conn.execute("create table FutureThings (x)")
    conn.close()
    proc = run_nixfs("mount", "--lower", store.lower, "--upper", store.upper, store.mnt)
    if proc.returncode == 0:
        run_nixfs("umount", store.mnt)
    assert proc.returncode == 2 and "FutureThings" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_lower_column_that_cannot_be_added_is_refused(tmp_path):
    """A lower column the merged database cannot be given (not null, no default) is
    named, and no row of the new shape is half copied."""
    store = ShapeStore(tmp_path, "nix-2.8")

    def change(conn):
        # A table rebuild (the only way to such a column), keeping the ids.
        with conn:
            conn.execute("pragma foreign_keys=off")
            conn.execute("create table NewPaths (id integer primary key autoincrement not null, "
                         "path text unique not null, hash text not null, registrationTime "
                         "integer not null, deriver text, narSize integer, ultimate integer, "
                         "sigs text, ca text, weight integer not null)")
            conn.execute("insert into NewPaths select *, 1 from ValidPaths")
            conn.execute("drop table ValidPaths")
            conn.execute("alter table NewPaths rename to ValidPaths")
        path = f"/nix/store/{fake_hash(1, 'w')}-w"
        (store.lower / "store" / path.rsplit("/", 1)[1]).mkdir()
        with conn:
            conn.execute("insert into ValidPaths (path, hash, registrationTime, weight) "
                         "values (?, 'sha256:00', 1, 5)", (path,))
        return path
    _refused_on_remount(store, change, ["ValidPaths.weight"])


def test_a_shape_change_while_mounted_stops_the_sync_whole(tmp_path):
    """While mounted, a lower table nixfs cannot follow stops the sync with one line
    naming it (`nixfs status`); the merged database gets nothing of that change and
    the mount goes on serving."""
    store = ShapeStore(tmp_path, "nix-2.26")
    with store.mount() as m:
        conn = apsw.Connection(str(store.db))
        with conn:
            conn.execute("create table FutureThings (x)")
        conn.close()
        new = add_path(store.db, "nix-2.26", 5, refs=store.paths[:1])
        proc = run_nixfs("sync", m.mnt)
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1 and "FutureThings" in proc.stderr, \
            proc.stderr

        def status_error():
            status = json.loads(run_nixfs("status", m.mnt, "--json").stdout)
            return status["nix"]["last_sync_error"]
        wait_until(lambda: "FutureThings" in status_error(), "the sync's error in nixfs status")
        assert len(status_error().splitlines()) == 1
        assert not store.valid(new)
        assert store.valid(store.paths[0])


def test_promote_carries_the_columns_the_lower_has(tmp_path):
    """A path a Determinate Nix registered through the mount (with its provenance) keeps
    it when promoted into a lower of that shape."""
    store = ShapeStore(tmp_path, "determinate")
    with store.mount():
        f = tmp_path / "hello.txt"
        f.write_text("hello")
        added = nix(store.root, "nix-store", "--add", f).stdout.strip()
        client = apsw.Connection(f"{store.mnt}/var/nix/db/db.sqlite")
        client.setbusytimeout(10_000)
        with client:
            client.execute("update ValidPaths set provenance = 'from the mount' where path = ?",
                           (added,))
        client.close()
        proc = run_nixfs("promote", "--upper", store.upper, "--into", store.lower, added)
        assert proc.returncode == 0, proc.stderr
    with closing(_lower(store)) as lower:
        assert lower.execute("select provenance from ValidPaths where path = ?",
                             (added,)).fetchone() == ("from the mount",)


def test_an_upper_of_an_earlier_nixfs_picks_up_the_lower_realisations(tmp_path):
    """An upper whose index predates realisations following (no ca_rows) is brought up
    to date at the next mount, without duplicating what its clone already had."""
    store = ShapeStore(tmp_path, "nix-2.34-ca")
    with store.mount():
        pass
    index = apsw.Connection(str(store.upper / ".nixfs/lower-index.sqlite"))
    with index:
        index.execute("delete from ca_rows")
        index.execute("delete from meta where key like 'ca_%'")
    index.close()
    conn = apsw.Connection(str(store.db))
    with conn:
        realise(conn, store.shape, "sha256:" + fake_hash(9, "later"), store.paths[5])
    conn.close()
    with store.mount():
        with closing(store.merged()) as merged:
            count = merged.execute("select count(*) from Realisations").fetchone()[0]
        assert store.merged_realisations() == store.lower_realisations()
        with closing(_lower(store)) as lower:
            assert count == lower.execute("select count(*) from Realisations").fetchone()[0]


def test_fsck_finds_an_upper_of_each_shape_clean(store):
    with store.mount():
        new = add_path(store.db, store.shape, 6, refs=store.paths[:2], realised=True)
        wait_until(lambda: store.valid(new), "a new lower path valid through the mount")
    proc = run_nixfs("fsck", "--lower", store.lower, "--upper", store.upper)
    assert proc.returncode == 0, proc.stdout + proc.stderr
