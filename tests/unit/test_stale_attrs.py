"""The refresher of stale attributes, on a plain directory (the mount's own use of it is
tested in test_cache.py: a second walk of a store path makes no request)."""

import dataclasses

import pytest
import trio

from nixfs.fuse import features, stale_attrs
from nixfs.fuse.stale_attrs import StaleAttributes


class Obj:
    """What the refresher needs of a node: its path below the mount's root."""

    def __init__(self, path: bytes):
        self._path = path

    def path(self) -> bytes:
        return self._path


@pytest.fixture(params=["in C", "os.lstat"])
def refresh_in(request, monkeypatch):
    if request.param == "in C" and not features.FEATURES.refresh_attributes:
        pytest.skip("needs pyfuse3 built with scripts/pyfuse3/ (08-refresh-attributes)")
    monkeypatch.setattr(features, "FEATURES", dataclasses.replace(
        features.FEATURES, refresh_attributes=request.param == "in C"))


async def test_objects_are_statted_once_after_a_delay_and_failures_counted(tmp_path, refresh_in):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("x")
    settled = {b"d": True, b"d/f": True, b"gone": True, b"changing": False}
    refresher = StaleAttributes(str(tmp_path), lambda o: settled[o.path()])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(refresher.run)
        objs = [Obj(p) for p in settled]
        for obj in objs + objs[:1]:  # stale twice: statted once
            refresher.stale(obj)
        await trio.sleep(stale_attrs.DELAY / 2)
        assert (refresher.refreshed, refresher.failed) == (0, 0)  # not before the delay
        await trio.sleep(stale_attrs.DELAY + stale_attrs.INTERVAL + 0.2)
        # Not settled any more ("changing"): not statted at all.
        assert (refresher.refreshed, refresher.failed) == (2, 1)
        nursery.cancel_scope.cancel()


async def test_a_pause_drops_what_is_pending_and_stats_nothing_until_it_ends(tmp_path, refresh_in):
    (tmp_path / "a").mkdir()
    refresher = StaleAttributes(str(tmp_path), lambda o: True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(refresher.run)
        refresher.stale(Obj(b"a"))
        await refresher.pause(0.5)
        refresher.stale(Obj(b"a"))  # stale during the pause: statted after it
        await trio.sleep(0.4)
        assert refresher.refreshed == 0
        await trio.sleep(stale_attrs.DELAY + stale_attrs.INTERVAL + 0.3)
        assert refresher.refreshed == 1
        nursery.cancel_scope.cancel()
