"""A SQLite connection in another process, driven over a pipe (test_cow_vfs.py).

Run as ``cowsql.py DB ROOT``: it opens DB through nixfs.cow.vfs.connect (bases below ROOT)
and then reads one statement a line from stdin, answering each with one line: ``ok`` and
the rows as JSON, or ``error`` and the message.  ``Remote`` is the parent's end.
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
