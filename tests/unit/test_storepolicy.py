"""The Nix store policy over an index whose pages lie on the lower (a generation's):
its queries run in the lower's worker threads, one at a time on the connection, and
a stuck one fails the lookup with EIO while the event loop goes on; what it learnt is
answered from memory without a query."""

import errno
import threading
import time

import pytest
import trio

from nixfs.nixdb.lowerindex import LowerIndex
from nixfs.nixdb.storepolicy import NixStorePolicy
from nixfs.overlay.lowerrunner import LowerRunner

NAMES = [b"%04d-p" % i for i in range(200)]


@pytest.fixture
def index(tmp_path):
    index = LowerIndex(str(tmp_path / "index.sqlite"))
    with index.transaction():
        index.add((name, i + 1, 1 if i % 10 == 3 else 0) for i, name in enumerate(NAMES))
    yield index
    index.close()


class Watched:
    """Wraps index queries: the threads they ran in and how many ran at once."""

    def __init__(self, index, *methods):
        self.threads, self.inside, self.most = set(), 0, 0
        self.lock = threading.Lock()
        for name in methods:
            setattr(index, name, self._wrap(getattr(index, name)))

    def _wrap(self, real):
        def query(*args):
            with self.lock:
                self.threads.add(threading.get_ident())
                self.inside += 1
                self.most = max(self.most, self.inside)
            time.sleep(0.002)  # widen the window two threads would share the connection in
            try:
                return real(*args)
            finally:
                with self.lock:
                    self.inside -= 1
        return query


async def test_queries_run_in_the_runners_threads_one_at_a_time(index):
    watched = Watched(index, "state", "states", "shown_after", "shown_names")
    policy = NixStorePolicy(index, run=LowerRunner(threads=4).run)
    shown = {}

    async def ask(name):
        shown[name] = await policy.lower_visible("store", name)

    async with trio.open_nursery() as nursery:
        for name in NAMES[:40]:
            nursery.start_soon(ask, name)
        nursery.start_soon(policy.entry_numbers, "store", NAMES[100:150])
        nursery.start_soon(policy.read_ahead, b"store/" + NAMES[50], 8)
        nursery.start_soon(policy.lower_names, "store")
    assert shown == {name: i % 10 != 3 for i, name in enumerate(NAMES[:40])}
    assert threading.get_ident() not in watched.threads and watched.most == 1
    queries = policy.queries
    assert await policy.cache_key(b"store/" + NAMES[0] + b"/bin") == NAMES[0] + b"\x001\x00bin"
    assert await policy.entry_numbers("store", NAMES[:3]) == [1, 2, 3]
    # A listing's chunk asked at once is remembered: the walk asks each name again.
    assert await policy.lower_visible("store", NAMES[120])
    assert await policy.cache_key(b"store/" + NAMES[140]) == NAMES[140] + b"\x00141\x00"
    # So are the paths read ahead of a walk, which it looks up next.
    assert await policy.entry_numbers("store", [NAMES[52]]) == [53]
    assert policy.queries == queries  # answered from memory
    many = [b"%06d-q" % i for i in range(NixStorePolicy.REMEMBERED_ASK + 1)]
    await policy.entry_numbers("store", many)
    assert await policy.lower_visible("store", NAMES[0])  # not pushed out by a long ask
    assert policy.queries == queries + 1


async def test_a_stuck_query_fails_with_eio_and_the_loop_goes_on(index):
    release = threading.Event()
    real = index.state
    index.state = lambda name: release.wait(10) and real(name)
    policy = NixStorePolicy(index, run=LowerRunner(timeout=0.3).run)
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        with pytest.raises(OSError) as e:
            await policy.lower_visible("store", NAMES[0])
        assert e.value.errno == errno.EIO and ticks >= 10
        release.set()
        await trio.sleep(0.05)  # the abandoned query finishes and lets go of the connection
        assert await policy.lower_visible("store", NAMES[1])
        nursery.cancel_scope.cancel()


async def test_a_local_index_is_asked_inline(index):
    watched = Watched(index, "state")
    policy = NixStorePolicy(index)
    assert await policy.lower_visible("store", NAMES[0])
    assert not await policy.lower_visible("store", NAMES[3])  # not shown
    assert not await policy.lower_visible("store", b"9999-gone")
    assert watched.threads == {threading.get_ident()}


async def test_a_change_by_another_connection_is_seen_at_the_next_query(index, tmp_path):
    policy = NixStorePolicy(index, run=LowerRunner().run)
    assert await policy.lower_visible("store", NAMES[0])
    other = LowerIndex(index.path)  # the sync worker's connection
    with other.transaction():
        other.set_state([NAMES[0]], 1)
    other.close()
    assert await policy.lower_visible("store", NAMES[0])  # remembered until a query
    policy.forget(b"store/" + NAMES[5])
    assert await policy.lower_visible("store", NAMES[5])  # a query: it sees the commit
    assert not await policy.lower_visible("store", NAMES[0])
