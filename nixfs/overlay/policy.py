"""What a particular kind of lower asks of the merged view.

The overlay shows every lower entry by default.  A policy can hide some (a Nix
store shows only the lower's valid store paths, and none of its database), list
a directory from somewhere cheaper than the lower itself, and hear about
whiteouts.  Directories the policy cares about carry a *tag*, given as nodes
are made: the root's is ``"/"``; a child's is ``tag(parent_tag, name)``.

What a policy may have to look up (which names are shown, listing keys, entry
numbers) is awaited: its answers may come from a file on the lower, read in the
lower's worker threads.  What it knows by the tag alone is answered at once.
"""


class LowerPolicy:
    ROOT = "/"

    def stats(self) -> dict:
        """What ``nixfs status`` shows of this kind of lower (nothing by default)."""
        return {}

    def tag(self, parent_tag: str, name: bytes) -> str | None:
        return None

    async def lower_visible(self, parent_tag: str, name: bytes) -> bool:
        return True

    async def lower_names(self, parent_tag: str) -> list[bytes] | None:
        """The visible lower names of a tagged directory, or None to list the lower."""
        return None

    async def whiteout_made(self, parent_tag: str, name: bytes) -> None:
        """A lower entry was hidden through the mount (``rm``, ``mv``)."""

    def immutable(self, parent_tag: str | None) -> bool:
        """Whether the lower objects in a directory with *parent_tag* never change while
        they exist: the kernel may keep their attributes long."""
        return False

    def complete(self, tag: str | None) -> bool:
        """Whether a lower directory with *tag* never gains or loses entries while it
        exists: the kernel may keep the answer that a name is not there."""
        return False

    async def cache_key(self, lower_path: bytes) -> bytes | None:
        """A key under which an immutable lower path's listing may be kept across
        mounts; it must change whenever the path's content may.  None: do not keep."""
        return None

    async def cache_tree(self, lower_path: bytes) -> tuple[bytes, bytes] | None:
        """``(top, prefix)``: the immutable lower tree that holds *lower_path* (its top
        path), whose listings are kept under *prefix* + their path below *top* (b"" for
        *top* itself), so that a store may read the whole tree's in one go; or None."""
        return None

    async def cache_keys(self, lower_paths: list[bytes]) -> list[bytes | None]:
        """``cache_key`` of each of *lower_paths* (the entries of one directory)."""
        return [await self.cache_key(p) for p in lower_paths]

    async def entry_numbers(self, parent_tag: str | None,
                            names: list[bytes]) -> list[int | None]:
        """For each lower entry *names* of a directory with *parent_tag*, a number that
        stays the same exactly as long as the entry is the same lower object, or None.
        The overlay numbers such an entry's node after it, so that a listing can tell
        the kernel a name's inode number without making its node (see readdir)."""
        return [None] * len(names)

    async def read_ahead(self, lower_path: bytes, count: int) -> list[bytes]:
        """Up to *count* lower paths a walk will likely want after the immutable
        *lower_path*, to be fetched in the background (none by default)."""
        return []

    def forget(self, lower_path: bytes) -> None:
        """The lower changed at *lower_path* (or the view of it did): drop anything
        remembered about it."""

    def link_lower_errno(self, dest_tag: str | None) -> int | None:
        """An errno to refuse hard-linking a lower file into a directory with *dest_tag*
        (which would copy the file up), or None to allow it."""
        return None
