"""A name for the state of a database one lock-free snapshot read: equal names, same rows.

A mount over a published generation, and every remount, catches up with the live
lower database from the ids it followed last (``follow``); deletions since are
found by a row count, which at a million paths is a third of a second on the way
to the first answer.  A generation's manifest, and the lower index after each
catch-up, keep the name of the state the count was taken in; where the live
database still has that name nothing changed, and the count is skipped.

What SQLite shows is the main file overlaid with the WAL's committed frames, so
the name has both parts, and any doubt leaves it out (None: the count is done):

- The WAL's committed frames are named by their content (``WalIndex.committed``):
  salts, checkpoint sequence, the end of the last commit and the cumulative
  checksum there.  Under one pair of salts committed frames are only ever
  appended; a restart draws new salts.  A writer that keeps the WAL open (as
  nix-daemon does) changes that part with every commit, also when the main
  file's header and size stay as they were.
- The main file by inode, size, mtime, ctime and its 100-byte header.  In rollback
  mode every commit moves the header's change counter; in WAL mode the main file
  is written only by checkpoints, which copy committed frames (the state stays,
  the name changes anyway: one count more).
- With no frame committed the main file alone is the state, and a session that
  opened a WAL, committed and checkpointed in the same clock tick as the write
  before the snapshot could leave all of it as it was.  A main file written less
  than ``RACY_NS`` before the snapshot opened therefore gets no name (as git's
  "racily clean" index entries get no trust).  That assumes the file system's
  clock and this one agree within it; a file that looks written in the future
  gets no name either.
"""

import json

FORMAT = 1
RACY_NS = 2_000_000_000


def of(snap) -> dict | None:
    """The name of the state *snap* (an open ``snapshot.Snapshot``) reads, or None."""
    st = snap.main_st
    wal = snap.wal.committed()
    if wal is None and snap.opened_ns - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
        return None
    return {"format": FORMAT, "main": [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                       snap.header.hex()], "wal": wal}


def encode(state: dict | None) -> str | None:
    """*state* as the text the lower index keeps (None stays None)."""
    return None if state is None else json.dumps(state, sort_keys=True, separators=(",", ":"))


def same(recorded, live: dict | None) -> bool:
    """Whether *recorded* (a name, or its ``encode``d text, or None) names the state
    *live* names; never for a missing or unknown name."""
    if recorded is None or live is None:
        return False
    if isinstance(recorded, str):
        try:
            recorded = json.loads(recorded)
        except ValueError:
            return False
    return isinstance(recorded, dict) and recorded.get("format") == FORMAT \
        and encode(recorded) == encode(live)
