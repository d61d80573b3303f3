"""The ``nixfs publish`` command: one publish, the list, pruning, or following the store.

The command line's one entry here; the work is in ``publisher`` and ``prune``.
``--follow`` polls the store database's signature (as a mount's follower does:
fresh opens, so NFS revalidates) and publishes after each change; SIGINT or
SIGTERM stops it once the publish under way is sealed (a second one ends it
at once: what it leaves is an incomplete generation, ignored and removed later).
"""

import json
import logging
import signal
import sys
import threading

import apsw

from ..nixdb.files import StoreFiles
from ..nixdb.follow import LowerFollower
from ..nixdb.snapshot import SnapshotError
from . import prune
from .generations import Generations
from .publisher import check_store, publish

log = logging.getLogger(__name__)


def publish_command(args) -> int:
    logging.basicConfig(level=logging.INFO, format="nixfs: %(message)s", stream=sys.stderr)
    store = check_store(args.store)
    if args.list:
        rows = prune.listing(store)
        print(json.dumps(rows, indent=1) if args.json else prune.render(rows))
        return 0
    try:
        if args.follow:
            return _follow(store, args)
        _once(store, args, force=args.force)
    except (SnapshotError, apsw.Error, OSError) as e:
        print(f"nixfs: publishing {store} failed: {e}", file=sys.stderr)
        return 1
    return 0


def _once(store: str, args, *, force: bool) -> None:
    done = publish(store, force=force, full=args.full)
    m = done.manifest
    size = prune.describe(Generations(store), done.number)["bytes"]  # on disk (deltas sparse)
    if args.json:
        print(json.dumps({"generation": done.number, "new": done.new, "seconds":
                          round(done.seconds, 3), "paths": m["lower_db"]["count"],
                          "depth": m["depth"], "bytes": size, "sha256": m["sha256"],
                          "phases": done.phases}))
    elif done.new:
        print(f"nixfs: published generation {done.number} ({m['lower_db']['count']} paths, "
              f"{size / 2**20:.1f} MiB on disk, depth {m['depth']}) in {done.seconds:.1f} s",
              file=sys.stderr)
    else:
        print(f"nixfs: generation {done.number} is current (the store's database has not "
              "changed)", file=sys.stderr)
    if args.keep:
        with Generations(store).locked():
            removed = prune.keep(store, args.keep)
        if removed and not args.json:
            print(f"nixfs: removed generations {', '.join(map(str, removed))}", file=sys.stderr)


def _follow(store: str, args) -> int:
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("stopping (after the publish under way, if any)")
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    follower = LowerFollower(StoreFiles(store, "", ""), None, {"lower_polls": 0})
    try:
        while not stop.is_set():
            if follower.changed():
                try:
                    _once(store, args, force=False)
                except (SnapshotError, apsw.Error, OSError) as e:
                    log.error("publishing failed (%s): trying again at the next change", e)
                    follower.forget_signature()
            stop.wait(args.interval)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 0
