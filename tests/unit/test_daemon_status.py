"""`nixfs status` in the daemon: each part's counters are read on the trio thread the
parts live on (their SQLite connections must not be used from two threads at once: a
status taken in a worker thread made a store listing fail with "Connection is busy in
another thread", and Nix 2.8's GC took that failed readdir for an empty store); only the
walk of the upper for its size runs in a worker thread, and the Nix store policy reads
its index's figures first, as it reads its index for lookups."""

import threading
import types

import trio

from nixfs.daemon.control import ControlApi


POLICY_KEYS = ("lower_paths", "lower_paths_not_shown", "lower_max_id", "index_bytes",
               "index_queries")
SERVICE_KEYS = ("last_sync_age_s", "sync_errors", "last_sync_error", "upper_copies_dropped",
                "first_build_finishing", "generation")


class Counters(dict):
    def __missing__(self, key):
        return 0


class Part:
    """A part of the daemon whose ``stats()`` notes the thread it ran in (its counters
    are 0, the keys status takes of a part's merged with another's named)."""

    def __init__(self, threads: set, *keys: str):
        self.threads, self.keys = threads, keys

    def stats(self) -> dict:
        self.threads.add(threading.get_ident())
        return Counters(dict.fromkeys(self.keys, 0))


class Policy(Part):
    """The Nix store policy: its index's figures are read before its ``stats()``."""

    refreshed = 0

    async def refresh_stats(self) -> None:
        self.refreshed += 1


def test_status_reads_the_parts_on_the_trio_thread_and_sizes_the_upper(tmp_path):
    threads = set()
    (tmp_path / "var/nix/db").mkdir(parents=True)
    (tmp_path / "var/nix/db/db.sqlite").write_bytes(b"x" * 65536)
    cfg = types.SimpleNamespace(mountpoint=str(tmp_path / "mnt"), lower="/lower",
                                upper=str(tmp_path), readonly=False)
    daemon = types.SimpleNamespace(cfg=cfg, ops=Part(threads), overlay=Part(threads),
                                   stale_attrs=None, policy=Policy(threads, *POLICY_KEYS),
                                   service=Part(threads, *SERVICE_KEYS))

    async def main():
        return threading.get_ident(), await ControlApi(daemon, poll_us=0).status()

    loop_thread, out = trio.run(main)
    assert threads == {loop_thread}
    assert daemon.policy.refreshed == 1
    assert out["upper_bytes"] >= 65536
    assert out["nix"]["merged_db_bytes"] == 65536
    # No refresher on a writable mount: turned off by -o refresh_attrs=off.
    assert out["attributes_refreshed"] == {"done": 0, "failed": 0, "off": "refresh_attrs=off"}
