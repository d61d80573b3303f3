"""A SQLite connection in another process, driven over a pipe (test_cow_vfs.py).

Run as ``cowsql.py DB ROOT``: it opens DB through nixfs.cow.vfs.connect (bases below ROOT)
and then reads one statement a line from stdin, answering each with one line: ``ok`` and
the rows as JSON, or ``error`` and the message.  ``Remote`` is the parent's end.
``cowsql.py DB ROOT JOURNAL`` is the crash loop's writer (``loop``).
"""

import json
import os
import subprocess
import sys

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Remote:
    """The parent's end: ``sql(statement)`` returns the rows or raises RuntimeError."""

    def __init__(self, db, root):
        self.proc = subprocess.Popen([sys.executable, __file__, str(db), str(root)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def sql(self, statement: str):
        self.proc.stdin.write(statement.replace("\n", " ") + "\n")
        self.proc.stdin.flush()
        kind, _, rest = self.proc.stdout.readline().rstrip("\n").partition(" ")
        if kind != "ok":
            raise RuntimeError(rest or "the child died")
        return [tuple(row) for row in json.loads(rest)]

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self.proc.stdout.close()


def main(db: str, root: str) -> None:
    sys.path.insert(0, _CHECKOUT)
    from nixfs.cow import vfs
    conn = vfs.connect(db, base_root=root)
    conn.setbusytimeout(0)
    for line in sys.stdin:
        try:
            rows = conn.execute(line).fetchall()
        except Exception as e:  # every failure goes back to the parent, which decides
            print("error", f"{type(e).__name__}: {e}".replace("\n", " "), flush=True)
        else:
            print("ok", json.dumps(rows), flush=True)
    conn.close()


def loop(db: str, root: str, journal: str) -> None:
    """The crash loop's writer: transaction N inserts row N and deletes row N-100, and says
    "committed N" once COMMIT has returned (synchronous=full: it is durable).  Every 23rd
    also checkpoints (WAL) and every 37th VACUUMs (the file shrinks and grows)."""
    sys.path.insert(0, _CHECKOUT)
    from nixfs.cow import vfs
    conn = vfs.connect(db, base_root=root)
    conn.setbusytimeout(10_000)
    conn.execute(f"pragma journal_mode={journal}").fetchall()
    conn.execute("pragma synchronous=full").fetchall()
    conn.execute("pragma cache_size=20").fetchall()  # spill: writes reach the file mid-transaction
    n = conn.execute("select n from meta").fetchall()[0][0]
    while True:
        n += 1
        with conn:
            conn.execute("insert into log values (?, randomblob(?))", (n, 100 + n % 900))
            conn.execute("delete from log where i = ?", (n - 100,))
            conn.execute("update meta set n = ?", (n,))
        print("committed", n, flush=True)
        if n % 23 == 0 and journal == "wal":
            conn.execute("pragma wal_checkpoint(truncate)").fetchall()
        if n % 37 == 0:
            conn.execute("vacuum")


if __name__ == "__main__":
    if len(sys.argv) > 3:
        loop(sys.argv[1], sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2])
