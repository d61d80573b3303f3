"""Where the generations of a store live, which of them are complete, and who writes.

Everything that names a generation's directory or file goes through here:
``STORE/var/nixfs/generations/N/`` with N decimal and never reused (the next
number is one past every directory there, complete or not, and past every number
sealed before, ``.highest``), complete once its ``manifest.json`` exists.  One
publisher at a time holds ``.lock`` there (an flock: a second one waits, a dead
one's lock goes with its process).
"""

import fcntl
import os
import stat
from contextlib import contextmanager

from ..pin import PinnedDir

GENERATIONS = "var/nixfs/generations"  # relative to STORE: the maps' base paths are too
MANIFEST = "manifest.json"
DB, INDEX, CATALOG = "db.sqlite", "lower-index.sqlite", "listings.sqlite"
FILES = (DB, INDEX, CATALOG)
LOCK = ".lock"
# The highest number ever given to a generation here: a number is never given twice, even
# after the newest generation was deleted by hand, because an upper's copy-on-write files
# name their bases by number (a mount that opens one anew must not find another's file).
HIGHEST = ".highest"


class Generations:
    """The generations directory of the store at *store* (holding store/ and var/nix)."""

    def __init__(self, store: str):
        self.store = store
        self.root = os.path.join(store, GENERATIONS)

    def dir(self, number: int) -> str:
        return os.path.join(self.root, str(number))

    def file(self, number: int, name: str) -> str:
        return os.path.join(self.dir(number), name)

    def manifest(self, number: int) -> str:
        return self.file(number, MANIFEST)

    @contextmanager
    def reached(self, number: int):
        """A path that reaches generation *number*'s directory with no walk down to it
        (``/proc/self/fd/N`` of a descriptor on it, while in the block): reading several
        of its files then costs a FUSE or NFS lower one lookup each, not five."""
        try:
            pinned = PinnedDir(self.dir(number))
        except OSError:
            yield self.dir(number)  # the reads say what is wrong
            return
        try:
            yield pinned.via
        finally:
            pinned.close()

    @staticmethod
    def rel(number: int, name: str) -> str:
        """A generation file's path relative to the store (as a COW map names its base)."""
        return f"{GENERATIONS}/{number}/{name}"

    def numbers(self) -> list[int]:
        """Every generation directory's number, complete or not, ascending."""
        return self._listed(complete=False)

    def complete(self) -> list[int]:
        """The numbers of complete generations (with a manifest), ascending."""
        return self._listed(complete=True)

    def _listed(self, *, complete: bool) -> list[int]:
        """The generation directories, (*complete*) those with a manifest: each looked
        at from one descriptor on the generations directory, so a lower that caches no
        names is asked one lookup a name, not a walk down from the store each."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            found = []
            for name in os.listdir(fd):
                if not (name.isdigit() and name == str(int(name))):
                    continue
                wanted = os.path.join(name, MANIFEST) if complete else name
                try:
                    st = os.stat(wanted, dir_fd=fd)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) if complete else stat.S_ISDIR(st.st_mode):
                    found.append(int(name))
            return sorted(found)
        finally:
            os.close(fd)

    def newest(self) -> int | None:
        done = self.complete()
        return done[-1] if done else None

    def make_next(self) -> int:
        """Make the next generation's (empty) directory; its number."""
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        existing = self.numbers()
        number = max(existing[-1] if existing else 0, self._highest()) + 1
        while True:
            try:
                os.mkdir(self.dir(number), 0o755)
                return number
            except FileExistsError:
                number += 1

    def _highest(self) -> int:
        try:
            with open(os.path.join(self.root, HIGHEST)) as f:
                return int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0  # none given yet here (or an older nixfs published: the directories say)

    def note_given(self, number: int) -> None:
        """Record *number* as given, before its generation is sealed (a directory that is
        removed again unsealed gave it to no upper).  Replaced whole: a crash leaves the
        old record or the new."""
        path = os.path.join(self.root, HIGHEST)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{number}\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    @contextmanager
    def locked(self):
        """Hold the publisher's lock (waiting for another publisher to finish)."""
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        fd = os.open(os.path.join(self.root, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


