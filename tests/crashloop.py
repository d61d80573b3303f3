"""kill -9 of the daemon in the middle of work, round after round (test and script).

One Nix store mount (its lower also holds plain data files) runs a workload in
threads: copy-ups (appends to lower files, fsync'ed), atomic replaces
(write, fsync, rename), in-place writes (fsync'ed), renames of lower files and
directories back and forth, ``nix-store --add`` through the mount, and hiding a
lower store path (a rename out of ``store/``) and showing it again.  Each op
records before it starts which contents are acceptable (old or new) and, once
it returned, only the new one.  At a random moment the daemon is killed; the
dead mount is detached, every other round ``nixfs fsck`` checks the upper
(``--repair`` if it found anything, then it must be clean), and a new mount
must show every file as its old or new content, fsync'ed data present, renamed
things under exactly one name, a merged database that passes
``integrity_check``, and every lower store path valid exactly when visible.
The lower must not change (every round by stat, at the end by content).
With *generation*, the lower gets a published generation first (``nixfs publish``): the
mounts then serve the merged database as a copy-on-write file over it.
"""

import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import lower_fingerprint  # noqa: E402
from harness import REPO, NixfsMount, force_unmount, run_nixfs  # noqa: E402
from nixstore import busybox_dir, derivations_nix, nix_build, nix_env  # noqa: E402

sys.path.insert(0, str(REPO))
from nixfs import control, runtime  # noqa: E402
from nixfs.fsck.run import fsck  # noqa: E402
from nixfs.nixdb.upperstore import UpperStore  # noqa: E402

LOWER_DRVS = {"liba": [], "libb": ["liba"], "app": ["liba", "libb"]}
COPIES_PER_ROUND = 5  # lower files copied up (by appends) per round, about
N_MOVE = 8        # lower files renamed back and forth
N_DIRS = 6        # lower directories renamed back and forth
N_REPLACE = 8     # upper files replaced atomically
N_PWRITE = 4      # upper files written in place


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_lower(base: Path) -> tuple[Path, dict]:
    """A Nix store built by Nix (liba <- libb <- app) at base/L; returns (L, out paths)."""
    bb = busybox_dir(base)
    expr = base / "lower.nix"
    expr.write_text(derivations_nix(bb, LOWER_DRVS))
    outs = nix_build(base / "L", expr, *LOWER_DRVS)
    return base / "L", dict(zip(LOWER_DRVS, outs))


def add_data(lower: Path, rng: random.Random, copies: int) -> None:
    """Plain files and directories in the lower beside the store."""
    data = lower / "data"
    data.mkdir()
    for i in range(copies):
        (data / f"c{i}").write_bytes(rng.randbytes(rng.randrange(8, 128) << 10))
    for i in range(N_MOVE):
        (data / f"m{i}").write_bytes(f"movable {i}\n".encode() * 100)
    for i in range(N_DIRS):
        d = lower / "tree" / f"d{i}"
        (d / "sub").mkdir(parents=True)
        (d / "a").write_text(f"a{i}\n")
        (d / "sub/b").write_text(f"b{i}\n")


def stat_print(root: Path) -> dict:
    """Cheap per-round fingerprint of a tree: any write to it changes a ctime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ["."]:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                               st.st_ctime_ns, st.st_ino)
    return out


def wait_dead(pid: int) -> None:
    """Until *pid* has exited (a zombie will do: its files, /dev/fuse too, are closed;
    reaping it may take PID 1 a while)."""
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b") ", 1)[1][:1] in (b"Z", b"X"):
                    return
        except (OSError, IndexError):
            return
        time.sleep(0.002)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b") ", 1)[1][:1] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def tree_of(path: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, path)] = Path(p).read_bytes()
    return out


class Expect:
    """Acceptable contents per file (hashes), updated by the workload."""

    def __init__(self):
        self.lock = threading.Lock()
        self.files: dict[str, set[str]] = {}
        self.durable: dict[str, str] = {}       # fsync'ed content each file must have
        self.pairs: dict[str, str] = {}         # renamed thing -> the name it must be at (or "?")
        self.added: dict[str, str | None] = {}  # store path -> content; None: in flight
        self.touched: set[str] = set()
        self.copied: set[int] = set()          # data/cN files appended to (copied up)
        self.copies = 0                        # how many data/cN files the lower has

    def begin(self, rel: str, new: bytes) -> str:
        h = sha(new)
        with self.lock:
            self.files[rel].add(h)
            self.touched.add(rel)
        return h

    def done(self, rel: str, h: str) -> None:
        with self.lock:
            self.files[rel] = {h}


class Workload:
    def __init__(self, mnt: Path, root: Path, expect: Expect, rng: random.Random, rnd: int):
        self.mnt, self.root, self.e, self.rng, self.round = mnt, root, expect, rng, rnd
        self.stop = threading.Event()
        self.killed = threading.Event()
        self.errors: list[str] = []
        self.ops = {"copy-up": 0, "append": 0, "replace": 0, "pwrite": 0, "rename": 0,
                    "nix-add": 0, "hide": 0}
        self.proc: subprocess.Popen | None = None

    def _loop(self, step, *args):
        r = random.Random(self.rng.random())
        while not self.stop.wait(0.01):  # room for the others (nix-store above all)
            try:
                step(r, *args)
            except OSError as e:
                if not self.killed.is_set():
                    self.errors.append(f"{step.__name__}: {e!r} before the daemon was killed")
                return  # the daemon is gone
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"{step.__name__}: {e!r}")
                return

    def append(self, r, part: int):
        """Append to a lower file (its first change copies it up), fsync'ed."""
        mine = range(part, self.e.copies, 2)  # each thread its own files
        copied = [i for i in mine if i in self.e.copied]
        fresh = [i for i in mine if i not in self.e.copied]
        i = r.choice(fresh if fresh and (not copied or r.random() < 0.3) else copied)
        rel = f"data/c{i}"
        p = self.mnt / rel
        cur = next(iter(self.e.files[rel])) if len(self.e.files[rel]) == 1 else None
        if cur is None:
            return
        tag = f"[round {self.round} {r.random()}]".encode()
        old = p.read_bytes()
        if sha(old) != cur:
            raise AssertionError(f"{rel} changed by itself")
        h = self.e.begin(rel, old + tag)
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, tag)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.e.done(rel, h)
        self.ops["append" if i in self.e.copied else "copy-up"] += 1
        self.e.copied.add(i)

    def replace(self, r):
        rel = f"w/f{r.randrange(N_REPLACE)}"
        new = r.randbytes(r.randrange(1, 256) << 10)
        tmp = self.mnt / f"w/tmp-{rel[-1]}"
        with open(tmp, "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        h = self.e.begin(rel, new)
        os.rename(tmp, self.mnt / rel)
        self.e.done(rel, h)
        self.ops["replace"] += 1

    def pwrite(self, r):
        rel = f"w/p{r.randrange(N_PWRITE)}"
        cur = self.e.files[rel]
        if len(cur) != 1:
            return
        fd = os.open(self.mnt / rel, os.O_RDWR)
        try:
            old = os.pread(fd, 1 << 20, 0)
            block = r.randrange(len(old) // 4096)
            data = r.randbytes(4096)
            new = old[:block * 4096] + data + old[(block + 1) * 4096:]
            h = self.e.begin(rel, new)
            os.pwrite(fd, data, block * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.e.done(rel, h)
        self.ops["pwrite"] += 1

    def rename(self, r):
        if r.random() < 0.5:
            name = f"data/m{r.randrange(N_MOVE)}"
        else:
            name = f"tree/d{r.randrange(N_DIRS)}"
        at = self.e.pairs[name]
        if at == "?":
            return
        other = name + "-x" if at == name else name
        with self.e.lock:
            self.e.pairs[name] = "?"
        os.rename(self.mnt / at, self.mnt / other)
        with self.e.lock:
            self.e.pairs[name] = other
        self.ops["rename"] += 1

    def nix_add(self, r):
        src = self.root / f"add-{self.round}-{r.randrange(1 << 30)}.txt"
        content = f"added in round {self.round}: {r.random()}\n"
        src.write_text(content)
        self.proc = subprocess.Popen(["nix-store", "--store", f"local?root={self.mnt.parent}",
                                      "--add", str(src)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=nix_env())
        out, _ = self.proc.communicate()
        src.unlink()
        if self.proc.returncode == 0:
            with self.e.lock:
                self.e.added[out.strip()] = content
            self.ops["nix-add"] += 1
        else:
            raise OSError("nix-store --add failed")  # the daemon is gone (or will be)

    def hide(self, r):
        """Move liba out of store/ (nixfs hides it and what refers to it), or show it again."""
        name = Path(self.e.pairs["store"]).name
        gone = self.mnt / "gone" / name
        if os.path.lexists(self.mnt / "store" / name):
            os.rename(self.mnt / "store" / name, gone)
        else:
            # Hidden: bring it back (also when an earlier unhide was cut short).
            if os.path.lexists(gone):
                shutil.rmtree(gone)
            try:
                control.request(str(self.mnt), "unhide", names=[name])
            except control.ControlError as e:
                raise OSError(str(e)) from None  # the daemon is gone
        self.ops["hide"] += 1

    def start(self) -> list[threading.Thread]:
        steps = [(self.append, 0), (self.append, 1), (self.replace,), (self.pwrite,),
                 (self.rename,), (self.nix_add,), (self.hide,)]
        threads = [threading.Thread(target=self._loop, args=s, daemon=True) for s in steps]
        for t in threads:
            t.start()
        return threads


class CrashLoop:
    def __init__(self, base: Path, lower_root: Path, store_paths: dict, seed: int = 1,
                 log=lambda *a: None, rounds: int = 50, generation: bool = False):
        self.base, self.rng, self.log, self.seed = base, random.Random(seed), log, seed
        self.lower_root = base / "L"
        if lower_root != self.lower_root:
            subprocess.run(["cp", "-a", str(lower_root), str(self.lower_root)], check=True)
        self.lower = self.lower_root / "nix"
        self.e = Expect()
        self.e.copies = max(100, COPIES_PER_ROUND * rounds)  # fresh ones to the last round
        add_data(self.lower, self.rng, self.e.copies)
        if generation:
            run_nixfs("publish", self.lower, check=True)
        self.paths = store_paths
        self.upper = base / "upper"
        self.root = base / "M"
        self.mnt = self.root / "nix"
        self.upper.mkdir()
        self.mnt.mkdir(parents=True)
        self.stats = {"rounds": 0, "fsck_runs": 0, "fsck_exit": {}, "fsck_kinds": {},
                      "ops": {}, "worker_left": 0, "seconds": 0.0}

    def mount(self) -> NixfsMount:
        return NixfsMount(self.lower, self.upper, self.mnt, log=self.base / "nixfs.log").start()

    def setup(self) -> None:
        m = self.mount()
        try:
            for i in range(self.e.copies):
                rel = f"data/c{i}"
                self.e.files[rel] = {sha((self.lower / rel).read_bytes())}
            (self.mnt / "w").mkdir()
            (self.mnt / "gone").mkdir()
            for i in range(N_REPLACE):
                (self.mnt / f"w/f{i}").write_bytes(b"initial\n")
                self.e.files[f"w/f{i}"] = {sha(b"initial\n")}
            for i in range(N_PWRITE):
                data = bytes(64 << 10)
                (self.mnt / f"w/p{i}").write_bytes(data)
                self.e.files[f"w/p{i}"] = {sha(data)}
            os.sync()
            for i in range(N_MOVE):
                self.e.pairs[f"data/m{i}"] = f"data/m{i}"
            for i in range(N_DIRS):
                self.e.pairs[f"tree/d{i}"] = f"tree/d{i}"
            self.e.pairs["store"] = self.paths["liba"]
        finally:
            m.stop()
        self.lower_full = lower_fingerprint(self.lower_root)
        self.lower_stat = stat_print(self.lower_root)

    def kill(self) -> list[int]:
        """SIGKILL the daemon (only it); return its children (the database worker)."""
        info = runtime.read_record(str(self.mnt))
        assert info, "no daemon record"
        kids = children(info["pid"])
        os.kill(info["pid"], 9)
        wait_dead(info["pid"])
        return kids

    def _workers_left(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"nixfs.nixdb.worker .*{self.upper}"],
                             capture_output=True, text=True).stdout.split()
        return [int(p) for p in out]

    def fsck(self, repair=False) -> dict:
        """``nixfs fsck`` in this process (what the command runs, without its start-up)."""
        return fsck(str(self.lower), str(self.upper), repair=repair).as_dict()

    def round(self, n: int) -> None:
        """Work on the live mount, kill it, check, mount again and verify."""
        self.e.touched.clear()
        self._t = {"t": time.monotonic()}
        try:
            w = Workload(self.mnt, self.base, self.e, self.rng, n)
            threads = w.start()
            time.sleep(self.rng.uniform(0.05, 0.5))
            w.killed.set()
            kids = self.kill()
            w.stop.set()
            for t in threads:
                t.join(20)
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
            assert not any(t.is_alive() for t in threads), "a workload thread hangs"
            assert not w.errors, w.errors
            for k, v in w.ops.items():
                self.stats["ops"][k] = self.stats["ops"].get(k, 0) + v
        finally:
            self._lap("work")
            force_unmount(self.mnt)
        deadline = time.monotonic() + 5
        for pid in kids:  # the database worker sees its daemon gone and exits by itself
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.005)
            if _alive(pid):
                self.stats["worker_left"] += 1
                os.kill(pid, 9)
        self._lap("cleanup")
        if n % 2:
            report = self.fsck()
            code = report["exit_code"]
            self.stats["fsck_runs"] += 1
            assert code in (0, 4), report
            self.stats["fsck_exit"][code] = self.stats["fsck_exit"].get(code, 0) + 1
            for f in report["findings"]:
                self.stats["fsck_kinds"][f["kind"]] = self.stats["fsck_kinds"].get(f["kind"], 0) + 1
                # A crash leaves only what the next mount puts right by itself.  A hide
                # cut short after its database commit leaves what referred to the hidden
                # path (libb, app) shown in the index without rows: the next mount hides
                # them, found from the lower database.
                assert f["severity"] != "damage" or f["kind"] in (
                    "row-without-files", "row-not-shown") or (
                    f["kind"] == "stray-temporary" and f["path"].startswith("/.nixfs/work/")) or (
                    f["kind"] == "shown-without-row" and self._hide_cut_short(f["path"])), f
            if code:
                report = self.fsck(repair=True)
                assert report["exit_code"] in (0, 1), report
                report = self.fsck()
                assert report["exit_code"] == 0, report
        self._lap("fsck")
        assert stat_print(self.lower_root) == self.lower_stat, "the lower changed"
        self._lap("lower")
        self.mount()
        self._lap("mount")
        self.verify(full=n % 10 == 9)
        self._lap("verify")

    def _hide_cut_short(self, path: str) -> bool:
        """*path* refers to the hidden store path, whose whiteout is in the upper."""
        hidden = Path(self.e.pairs["store"]).name
        return path in (self.paths["libb"], self.paths["app"]) and \
            UpperStore(str(self.upper)).hidden(hidden.encode())

    def _lap(self, what: str) -> None:
        now = time.monotonic()
        laps = self.stats.setdefault("phase_seconds", {})
        laps[what] = round(laps.get(what, 0) + now - self._t["t"], 2)
        self._t["t"] = now

    def verify(self, full: bool = False) -> None:
        e, mnt = self.e, self.mnt
        check = set(e.touched) | set(self.rng.sample(sorted(e.files), 8))
        for rel in sorted(check):
            h = sha((mnt / rel).read_bytes())
            assert h in e.files[rel], f"{rel}: torn or lost (neither old nor new content)"
            e.files[rel] = {h}
        for name, at in e.pairs.items():
            if name == "store":
                continue
            there = [p for p in (name, name + "-x") if os.path.lexists(mnt / p)]
            assert len(there) == 1 and at in (there[0], "?"), f"{name}: at {there}, expected {at}"
            e.pairs[name] = there[0]
            want = self.lower / name
            if want.is_dir():
                assert tree_of(mnt / there[0]) == tree_of(want), f"{name}: contents differ"
            else:
                assert (mnt / there[0]).read_bytes() == want.read_bytes()
        db = sqlite3.connect(f"file:{mnt}/var/nix/db/db.sqlite", uri=True, timeout=30)
        try:
            assert db.execute("pragma integrity_check").fetchall() == [("ok",)]
            valid = {p for (p,) in db.execute("select path from ValidPaths")}
        finally:
            db.close()
        for path, content in list(e.added.items()):
            if content is not None:
                assert path in valid, f"{path}: added (nix-store --add returned) but not valid"
                assert (self.root / path.lstrip("/")).read_text() == content
        if full:  # every valid path's contents match its hash (also adds cut short)
            proc = subprocess.run(["nix-store", "--store", f"local?root={self.root}", "--verify",
                                   "--check-contents"], capture_output=True, text=True,
                                  env=nix_env())
            assert proc.returncode == 0, proc.stderr
        for name, path in self.paths.items():
            visible = os.path.lexists(self.root / path.lstrip("/"))
            assert visible == (path in valid), \
                f"{name} {path}: {'visible' if visible else 'not visible'} but " \
                f"{'valid' if path in valid else 'not valid'}"

    def run(self, rounds: int) -> dict:
        start = time.monotonic()
        self.setup()
        try:
            self.mount()
            for n in range(rounds):
                try:
                    self.round(n)
                except AssertionError as e:  # the kill's timing is random: say where it was
                    raise AssertionError(f"seed {self.seed}, round {n}: {e}") from e
                self.stats["rounds"] += 1
                self.log(f"round {n}: ok ({time.monotonic() - start:.1f} s)")
            # A clean unmount after all that: fsck finds the upper clean, the lower untouched.
            NixfsMount(self.lower, self.upper, self.mnt).stop()
        finally:
            force_unmount(self.mnt)
            for pid in self._workers_left():
                os.kill(pid, 9)
        proc = run_nixfs("fsck", "--lower", self.lower, "--upper", self.upper)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert lower_fingerprint(self.lower_root) == self.lower_full, "the lower changed"
        self.stats["seconds"] = round(time.monotonic() - start, 1)
        return self.stats
