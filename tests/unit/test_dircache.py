"""The listing cache over a published catalog reads a store path's tree in one query:
every listing of it remembered, the xattr records beside them left as they are."""

import os

import trio

from nixfs.nixdb.storepolicy import listing_key
from nixfs.overlay.dircache import DirCache
from nixfs.overlay.liststore import ListingStore
from nixfs.overlay.listingformat import Listing, pack_stat


class OnLower(ListingStore):
    """A store read as a generation's catalog would be (its queries go to a worker)."""
    on_lower = True

    def base_reads(self) -> int:
        return 0


def test_a_miss_reads_the_rest_of_its_tree_in_one_query(tmp_path):
    st = pack_stat(os.lstat(tmp_path))
    listing = Listing({b".": st, b"a": st}, {})
    key = lambda rel: listing_key(b"abc-pkg", 7, rel)  # noqa: E731
    store = OnLower(str(tmp_path / "listings.sqlite"))
    for rel in (b"", b"bin", b"share", b"share/doc"):
        store.put(key(rel), listing)
    store.put_xattrs(key(b"bin"), {b"a": {"user.x": b"1"}})
    store.put(listing_key(b"abd-other", 8, b""), listing)  # another store path: not read
    store.flush()

    async def run(fn, *args):
        return await trio.to_thread.run_sync(fn, *args)

    cache = DirCache(store, run=run)

    async def tree(path):
        return b"store/abc-pkg", key(b"")

    async def main():
        assert (await cache.get(b"store/abc-pkg/bin", key(b"bin"), tree)) == listing
        assert store.queries == 1
        for rel in (b"share", b"share/doc"):  # after bin in key order: read along
            assert cache.has(b"store/abc-pkg/" + rel, key(rel))
        assert not cache.has(b"store/abd-other", listing_key(b"abd-other", 8, b""))
        assert await cache.get(b"store/abc-pkg/share/doc", key(b"share/doc"), tree) == listing
        assert store.queries == 1 and cache.loads == 3 and cache.misses == 0
        store.flush()  # a record taken for damaged would be deleted now
        assert await cache.get_xattrs(b"store/abc-pkg/bin", key(b"bin")) == {b"a": {"user.x": b"1"}}

    trio.run(main)
    store.close()
