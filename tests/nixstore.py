"""Nix stores for tests and benchmarks: real ones built by Nix, and synthetic databases."""

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nixfs.nixdb.schema import DDL  # noqa: E402

NIX_CONFIG = "\n".join(["sandbox = false", "build-users-group =", "substituters =",
                        "experimental-features = nix-command", "fsync-metadata = false"])
BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def nix_env(**extra) -> dict:
    env = dict(os.environ, NIX_CONFIG=NIX_CONFIG)
    env.update(extra)
    return env


def fake_hash(i: int, salt: str = "") -> str:
    digest = hashlib.sha256(f"{salt}{i}".encode()).digest()
    return "".join(BASE32[b % 32] for b in digest[:32])


def generate_db(path: Path, count: int, *, refs: int = 8, seed: int = 1, salt: str = "",
                first_id: int = 1, store_dirs: Path | None = None) -> list[str]:
    """A schema-10 database of *count* synthetic paths with *refs* references each.

    Returns the store paths.  With *store_dirs*, also makes each path's directory.
    """
    import apsw
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "schema").write_text("10")
    conn = apsw.Connection(str(path))
    conn.execute("pragma journal_mode=wal; pragma synchronous=off")
    conn.execute(DDL)
    paths = []
    with conn:
        for i in range(count):
            drv = i % 3 == 0
            name = f"pkg{i}" + (".drv" if drv else "")
            p = f"/nix/store/{fake_hash(i, salt)}-{name}"
            paths.append(p)
            deriver = None if drv or i == 0 else paths[i - 1]
            conn.execute("insert into ValidPaths (id, path, hash, registrationTime, deriver, narSize,"
                         " ultimate, sigs, ca) values (?,?,?,?,?,?,?,?,?)",
                         (first_id + i, p, "sha256:" + hashlib.sha256(p.encode()).hexdigest(),
                          1700000000 + i, deriver, 1000 + i, 1 if not drv else None,
                          "cache.example.org-1:" + "A" * 88 + "==", None))
            for j in {rng.randrange(i) for _ in range(refs)} if i else ():
                conn.execute("insert into Refs values (?, ?)", (first_id + i, first_id + j))
            if drv:
                conn.execute("insert into DerivationOutputs values (?, 'out', ?)",
                             (first_id + i, p[:-4] + "-out"))
            if store_dirs is not None:
                (store_dirs / os.path.basename(p)).mkdir(parents=True, exist_ok=True)
    conn.close()
    return paths


def make_store(root: Path, count: int = 300) -> list[str]:
    """A store of *count* paths with directories, files, a symlink and an xattr."""
    (root / "store").mkdir(parents=True)
    paths = generate_db(root / "var/nix/db/db.sqlite", count, store_dirs=root / "store")
    first = root / "store" / os.path.basename(paths[1])
    (first / "bin").mkdir()
    (first / "bin/tool").write_text("#!/bin/sh\n")
    (first / "lib").symlink_to("bin")
    (first / "share/doc").mkdir(parents=True)
    os.setxattr(first / "bin/tool", "user.nixfs-test", b"value")
    return paths


def busybox_dir(base: Path) -> Path:
    d = base / "busybox"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "busybox").exists():
        shutil.copy(shutil.which("busybox") or "/bin/busybox", d / "busybox")
    return d


def derivations_nix(busybox: Path, names: dict[str, list[str]], tag: str = "") -> str:
    """A Nix expression with a derivation per name (depending on the listed names)."""
    lines = ["let", f'  bb = builtins.path {{ path = {busybox}; name = "busybox"; }};',
             "  mk = name: deps: derivation {",
             "    inherit name; system = builtins.currentSystem;",
             '    builder = "${bb}/busybox";',
             '    args = [ "sh" "-c" "${bb}/busybox mkdir -p $out/bin && '
             f'echo ${{name}} {tag} ${{toString deps}} > $out/bin/${{name}}" ];',
             "  };"]
    for name, deps in names.items():
        lines.append(f"  {name} = mk \"{name}\" [ {' '.join(deps)} ];")
    lines.append("in { " + " ".join(f"inherit {n};" for n in names) + " }")
    return "\n".join(lines) + "\n"


def nix_build(store_root: Path, expr_file: Path, *attrs: str, check=True) -> list[str]:
    """Build *attrs* of *expr_file* into the chroot store at *store_root*; return out paths."""
    cmd = ["nix-build", "--store", f"local?root={store_root}", str(expr_file), "--no-out-link"]
    for a in attrs:
        cmd += ["-A", a]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=nix_env())
    if check and proc.returncode != 0:
        raise RuntimeError(f"nix-build failed: {proc.stderr}")
    return proc.stdout.split()


def nix(store_root: Path, *args, check=True) -> subprocess.CompletedProcess:
    """Run a nix-store-style command (first arg is the program) against a chroot store."""
    cmd = [args[0], "--store", f"local?root={store_root}", *map(str, args[1:])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=nix_env())
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return proc
