"""Random operation sequences for COW files, the same ones applied to a plain file.

The differential tests (test_cow.py) and the crash tests (test_cow_crash.py, whose child
process runs this file) share them: offsets cluster at page edges, at the size and at the
base's end, where an off-by-one would hide in the middle of a page.
"""

import os
import random
import sys

PAGE = 512


def _offset(rng: random.Random, size: int, base_size: int, page: int) -> int:
    """Where to act: anywhere, at a page edge, at the size, at the base's end (base_size is
    where the base's bytes stop showing: its size, lowered by truncations)."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randrange(size + 2 * page + 1)
    if kind == 1:
        return max(0, rng.randrange(size // page + 3) * page + rng.choice((-1, 0, 0, 1)))
    if kind == 2:
        return max(0, size + rng.randint(-3, 3))
    if kind == 3:
        return max(0, base_size + rng.randint(-3, 3))
    return rng.randrange(max(size, 1))


def ops(seed: int, base_size: int, count: int = 300, page: int = PAGE):
    """Yield (op, args): write (offset, bytes), read (n, offset), truncate (n), fsync,
    reopen.  Sizes are tracked to aim offsets well."""
    rng = random.Random(seed)
    size = limit = base_size
    for i in range(count):
        r = rng.random()
        if r < 0.40:
            off = _offset(rng, size, limit, page)
            n = rng.choice((1, 2, page - 1, page, page + 1, 3 * page, rng.randrange(1, 4 * page)))
            yield "write", (off, rng.randbytes(n))
            size = max(size, off + n)
        elif r < 0.60:
            yield "read", (rng.choice((1, page, page + 3, 5 * page, size + page)),
                           _offset(rng, size, limit, page))
        elif r < 0.70:  # a read that ends just around where the base's bytes stop
            n = rng.choice((1, 2, 7, page // 2, page, 2 * page))
            yield "read", (n, max(0, limit + rng.randint(-1, 2) - n))
        elif r < 0.82:
            n = _offset(rng, size, limit, page) if rng.random() < 0.7 else size + rng.randrange(3 * page)
            yield "truncate", (n,)
            size, limit = n, min(limit, n)
        elif r < 0.94:
            yield "fsync", ()
        else:
            yield "reopen", ()


def apply_plain(fd: int, op: str, args) -> bytes | None:
    """The operation on a plain file (the reference); a read's bytes."""
    if op == "write":
        os.pwrite(fd, args[1], args[0])
    elif op == "read":
        return os.pread(fd, *args)
    elif op == "truncate":
        os.ftruncate(fd, args[0])
    return None


def apply_cow(cow, op: str, args) -> bytes | None:
    if op == "write":
        cow.pwrite(args[1], args[0])
    elif op == "read":
        return cow.pread(*args)
    elif op == "truncate":
        cow.truncate(args[0])
    elif op == "fsync":
        cow.fsync()
    return None


def child(directory: str, seed: int, base_size: int, count: int) -> None:
    """The crash test's child: run the ops on DIR/f (COW over DIR/base), say "synced N"
    after the Nth fsync has returned, and "done" at the end; then wait to be killed."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from nixfs.cow.bases import base_opener
    from nixfs.cow.cowfile import CowFile
    path = os.path.join(directory, "f")
    cow = CowFile.open(path, os.path.join(directory, ".wh..wh..nixfs-cow.f"), base_opener(directory))
    synced = 0
    for op, args in ops(seed, base_size, count):
        if op == "reopen":
            continue
        apply_cow(cow, op, args)
        if op == "fsync":
            synced += 1
            print("synced", synced, flush=True)
    print("done", flush=True)
    sys.stdin.read()  # until killed


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
