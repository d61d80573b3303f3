"""Mixed load on a Nix store mount from several client processes, every byte checked.

Used by tests/system/test_load.py (short, in CI) and scripts/loadtest (long): the same code
with a different duration.  Each client works in its own directory of the mount and
on its own lower files, keeps a model of what every file must hold, and at the end
compares the whole model with the mount; ``nix-store --add`` results are checked
with Nix.  The parent samples the daemon's descriptors and memory meanwhile.

    python tests/load.py client MOUNT_ROOT INDEX SECONDS SEED OUT.json
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOWER_FILES = 12  # lower files per client, each copied up while the load runs
ADD_EVERY = 1.5  # seconds between one client's nix-store --add runs


def lower_content(client: int, j: int) -> bytes:
    return (f"client {client} lower file {j}\n".encode()) * (j * 37 + 1)


def make_lower(nix_dir: Path, clients: int) -> list[str]:
    """A synthetic Nix store lower plus ``data/cN/fJ`` files for each client."""
    sys.path.insert(0, str(HERE))
    from relharness import synthetic_store
    names = synthetic_store(nix_dir, 12)
    for c in range(clients):
        d = nix_dir / "data" / f"c{c}"
        d.mkdir(parents=True)
        for j in range(LOWER_FILES):
            (d / f"f{j}").write_bytes(lower_content(c, j))
    return names


# ------------------------------------------------------------------ the client process

class Client:
    def __init__(self, root: Path, index: int, seed: int):
        self.root, self.index = root, index
        self.nix = root / "nix"
        self.rng = random.Random(seed)
        self.work = self.nix / f"load{index}"
        self.lower_dir = self.nix / "data" / f"c{index}"
        self.model: dict[str, bytes] = {}
        self.lower: dict[int, bytes] = {j: lower_content(index, j) for j in range(LOWER_FILES)}
        self.added: list[tuple[str, bytes]] = []
        self.ops: dict[str, int] = {}
        self.errors: list[str] = []
        self.counter = 0
        self.next_add = 0.0
        self.tmp = Path(tempfile.mkdtemp(prefix=f"nixfs-load{index}-"))

    def _data(self) -> bytes:
        size = self.rng.choice((0, 1, 100, 4096, 20_000, 70_000, 200_000))
        return self.rng.randbytes(size)

    def _name(self) -> str:
        self.counter += 1
        return f"n{self.counter}"

    def _pick(self) -> str | None:
        return self.rng.choice(sorted(self.model)) if self.model else None

    def op_create(self):
        name, data = self._name(), self._data()
        with open(self.work / name, "wb") as f:
            f.write(data)
        self.model[name] = data

    def op_write(self):
        name = self._pick()
        if name is None:
            return self.op_create()
        old = self.model[name]
        off = self.rng.randrange(len(old) + 1)
        data = self.rng.randbytes(self.rng.choice((1, 512, 8192, 100_000)))
        fd = os.open(self.work / name, os.O_WRONLY)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        self.model[name] = old[:off] + data + old[off + len(data):]

    def op_read(self):
        name = self._pick()
        if name is None:
            return
        got = (self.work / name).read_bytes()
        if got != self.model[name]:
            self.errors.append(f"read {name}: {len(got)} bytes, expected {len(self.model[name])}")

    def op_copyup(self):
        j = self.rng.randrange(LOWER_FILES)
        extra = self.rng.randbytes(self.rng.choice((1, 300, 5000)))
        with open(self.lower_dir / f"f{j}", "ab") as f:
            f.write(extra)
        self.lower[j] += extra

    def op_rename(self):
        name = self._pick()
        if name is None:
            return
        target = self._pick() if self.rng.random() < 0.3 else self._name()
        os.rename(self.work / name, self.work / target)
        if target != name:
            self.model[target] = self.model.pop(name)

    def op_unlink(self):
        name = self._pick()
        if name is None:
            return
        os.unlink(self.work / name)
        del self.model[name]

    def op_add(self):
        if time.monotonic() < self.next_add:
            return self.op_read()
        self.next_add = time.monotonic() + ADD_EVERY
        data = f"client {self.index} add {self.counter}\n".encode() + self.rng.randbytes(64)
        self.counter += 1
        src = self.tmp / f"added-{self.index}-{self.counter}"
        src.write_bytes(data)
        proc = subprocess.run(["nix-store", "--store", f"local?root={self.root}", "--add",
                               str(src)], capture_output=True, text=True, env=_nix_env())
        if proc.returncode != 0:
            raise RuntimeError(f"nix-store --add: {proc.stderr.strip()[-300:]}")
        self.added.append((proc.stdout.strip(), data))

    WEIGHTS = {"create": 20, "write": 20, "read": 25, "copyup": 10, "rename": 10, "unlink": 10,
               "add": 5}

    def run(self, seconds: float) -> dict:
        self.work.mkdir()
        kinds = list(self.WEIGHTS)
        weights = [self.WEIGHTS[k] for k in kinds]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            kind = self.rng.choices(kinds, weights)[0]
            try:
                getattr(self, "op_" + kind)()
            except Exception as e:  # counted and reported: the test requires none
                self.errors.append(f"{kind}: {e!r}")
            self.ops[kind] = self.ops.get(kind, 0) + 1
        return self.verify()

    def verify(self) -> dict:
        checked = 0
        names = set(os.listdir(self.work))
        if names != set(self.model):
            self.errors.append(f"listing differs: {sorted(names ^ set(self.model))[:10]}")
        for name, data in self.model.items():
            got = (self.work / name).read_bytes()
            checked += len(got)
            if got != data:
                self.errors.append(f"final {name}: {len(got)} bytes, expected {len(data)}")
        for j, data in self.lower.items():
            got = (self.lower_dir / f"f{j}").read_bytes()
            checked += len(got)
            if got != data:
                self.errors.append(f"final lower f{j}: {len(got)} bytes, expected {len(data)}")
        for path, data in self.added:
            got = (self.root / path.lstrip("/")).read_bytes()
            checked += len(got)
            if got != data:
                self.errors.append(f"added {path} differs")
        if self.added:
            proc = subprocess.run(["nix-store", "--store", f"local?root={self.root}",
                                   "--check-validity"] + [p for p, _ in self.added],
                                  capture_output=True, text=True, env=_nix_env())
            if proc.returncode != 0:
                self.errors.append(f"added paths not valid: {proc.stderr.strip()[-300:]}")
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)
        return {"ops": self.ops, "errors": self.errors, "bytes_verified": checked,
                "files": len(self.model), "added": len(self.added)}


def _nix_env() -> dict:
    sys.path.insert(0, str(HERE))
    from nixstore import nix_env
    return nix_env()


# ------------------------------------------------------------------ the parent

def _daemon_sample(pid: int) -> tuple[int, int]:
    from relharness import fd_count, rss_bytes
    return fd_count(pid), rss_bytes(pid)


def _cached_fds(mnt: Path) -> int:
    """Descriptors the daemon keeps on purpose (its directory, lower-file and by-node
    file caches)."""
    from relharness import status
    s = status(mnt)
    return s["open_dir_fds"] + s["shared_lower_files"] + s["node_file_fds"]


def run_load(root: Path, daemon_pid: int, *, seconds: float, clients: int = 8,
             seed: int = 1) -> dict:
    """Run *clients* client processes on the Nix store mount at ``root/nix`` for
    *seconds*; return their results and the daemon's descriptor and memory figures."""
    sys.path.insert(0, str(HERE))
    out_dir = Path(tempfile.mkdtemp(prefix="nixfs-load-"))
    cached0 = _cached_fds(root / "nix")
    fds0, rss0 = _daemon_sample(daemon_pid)
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "client", str(root),
                               str(i), str(seconds), str(seed * 1000 + i),
                               str(out_dir / f"{i}.json")])
             for i in range(clients)]
    started = time.monotonic()
    fds_max, rss_max = fds0, rss0
    timeline = []  # (seconds, fds, rss): growth shows as a slope, a cache filling as a plateau
    try:
        while any(p.poll() is None for p in procs):
            fds, rss = _daemon_sample(daemon_pid)
            fds_max, rss_max = max(fds_max, fds), max(rss_max, rss)
            timeline.append((time.monotonic() - started, fds, rss))
            if time.monotonic() - started > seconds + 300:
                raise RuntimeError("the load clients did not finish")
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # handles closed by exiting clients reach the daemon
    fds1, rss1 = _daemon_sample(daemon_pid)
    cached1 = _cached_fds(root / "nix")
    results = []
    for i, p in enumerate(procs):
        path = out_dir / f"{i}.json"
        if p.returncode != 0 or not path.exists():
            results.append({"ops": {}, "errors": [f"client {i} exited with {p.returncode}"],
                            "bytes_verified": 0, "files": 0, "added": 0})
        else:
            results.append(json.loads(path.read_text()))
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)
    ops: dict[str, int] = {}
    for r in results:
        for k, v in r["ops"].items():
            ops[k] = ops.get(k, 0) + v
    return {
        "clients": clients, "seconds": round(elapsed, 1), "ops": ops,
        "ops_total": sum(ops.values()), "ops_per_s": round(sum(ops.values()) / elapsed, 1),
        "nix_adds": sum(r["added"] for r in results),
        "bytes_verified": sum(r["bytes_verified"] for r in results),
        "errors": [e for r in results for e in r["errors"]],
        "daemon_fds": {"before": fds0, "max": fds_max, "after": fds1,
                       # the rest: FUSE, sockets, databases, open handles
                       "uncached_before": fds0 - cached0, "uncached_after": fds1 - cached1},
        "daemon_rss_mib": {"before": round(rss0 / 2**20, 1), "max": round(rss_max / 2**20, 1),
                           "after": round(rss1 / 2**20, 1)},
        # fds and RSS (MiB) at each tenth of the run
        "timeline": [(round(t), f, round(r / 2**20, 1))
                     for t, f, r in timeline[::max(1, len(timeline) // 10)]],
    }


def main(argv: list[str]) -> int:
    if len(argv) == 6 and argv[0] == "client":
        root, index, seconds, seed, out = argv[1:]
        result = Client(Path(root), int(index), int(seed)).run(float(seconds))
        Path(out).write_text(json.dumps(result))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
