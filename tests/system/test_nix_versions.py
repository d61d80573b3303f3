"""Real newer Nix releases on nixfs mounts: Debian trixie's Nix 2.26 and sid's 2.34.

Each runs from a cached Debian chroot (scripts/nix-chroots, which makes them on first
use: a few minutes of downloads, hence `slow`), entered with a mount namespace and
pivot_root so its builds work; the test's directory is bound at the same path, so it
sees the nixfs mount where the host does.  The host's own Nix is Debian's 2.8.

    scripts/test --slow -k nix_versions     (or: pytest -m slow tests/system/test_nix_versions.py)
"""

import os
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
from harness import NixfsMount, run_nixfs, wait_until
from nixstore import NIX_CONFIG, busybox_dir, derivations_nix, nix, nix_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="chroots and namespaces need root")]

REPO = Path(__file__).resolve().parents[2]
CHROOTS = REPO / "scripts/nix-chroots"
VERSIONS = {"trixie": "2.26", "sid": "2.34"}
LOWER_DRVS = {"liba": [], "libb": ["liba"], "app": ["liba", "libb"]}
CA_CONFIG = NIX_CONFIG.replace("experimental-features = nix-command",
                               "experimental-features = nix-command ca-derivations")


class ChrootNix:
    """A Nix release in a chroot, run against chroot stores under *base*."""

    def __init__(self, name: str, base: Path):
        self.name, self.base = name, base
        out = subprocess.run([str(CHROOTS), "path", name], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.fail(f"scripts/nix-chroots path {name}: {out.stderr.strip()}")
        self.version = self.run("nix-store", "--version").stdout.split()[-1]

    def run(self, *args, ca=False, check=True, store=None) -> subprocess.CompletedProcess:
        cmd = [str(CHROOTS), "run", self.name, "-b", str(self.base), "--", args[0]]
        if store is not None:
            cmd += ["--store", f"local?root={store}"]
        cmd += [str(a) for a in args[1:]]
        env = nix_env(NIX_CONFIG=CA_CONFIG if ca else NIX_CONFIG)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"Nix {self.name}: {' '.join(map(str, args))} failed "
                               f"({proc.returncode}): {proc.stderr}")
        return proc

    def build(self, store, expr, *attrs, ca=False) -> tuple[list[str], list[str]]:
        """Out paths, and the derivations it built."""
        args = ["nix-build", expr, "--no-out-link"]
        for a in attrs:
            args += ["-A", a]
        proc = self.run(*args, ca=ca, store=store)
        return proc.stdout.split(), [line for line in proc.stderr.splitlines()
                                     if line.startswith("building ")]


@pytest.fixture(params=sorted(VERSIONS), ids=lambda n: f"nix-{VERSIONS[n]}")
def setup(request, tmp_path):
    newnix = ChrootNix(request.param, tmp_path)
    assert newnix.version.startswith(VERSIONS[request.param]), newnix.version
    return Setup(tmp_path, newnix)


class Setup:
    def __init__(self, tmp, newnix):
        self.tmp, self.newnix = tmp, newnix
        self.busybox = busybox_dir(tmp)
        self.lower_root = tmp / "L"
        self.lower = self.lower_root / "nix"
        self.upper = tmp / "upper"
        self.upper.mkdir()
        self.root = tmp / "M"
        self.mnt = self.root / "nix"
        self.mnt.mkdir(parents=True)
        self.expr_file = self.expr(LOWER_DRVS)
        outs, _ = newnix.build(self.lower_root, self.expr_file, *LOWER_DRVS)
        self.paths = dict(zip(LOWER_DRVS, outs))

    def expr(self, names, ca=False):
        f = self.tmp / f"expr-{'-'.join(names)}.nix"
        text = derivations_nix(self.busybox, {**LOWER_DRVS, **names})
        if ca:  # *names* become content-addressed derivations; the lower's stay as they are
            text = text.replace("in {", "  mkca = name: deps: derivation ((mk name deps).drvAttrs // {\n"
                                '    __contentAddressed = true; outputHashMode = "recursive";\n'
                                '    outputHashAlgo = "sha256"; });\nin {', 1)
            for name in names:
                text = text.replace(f"  {name} = mk ", f"  {name} = mkca ")
        f.write_text(text)
        return f

    def mount(self):
        return NixfsMount(self.lower, self.upper, self.mnt)

    def host_valid(self, path) -> bool:
        return nix(self.root, "nix-store", "--check-validity", path, check=False).returncode == 0

    def new_valid(self, path) -> bool:
        return self.newnix.run("nix-store", "--check-validity", path, store=self.root,
                               check=False).returncode == 0

    def merged(self):
        return closing(sqlite3.connect(f"file:{self.mnt}/var/nix/db/db.sqlite?mode=ro", uri=True))

    def upper_paths(self) -> set[str]:
        return {n.split("-", 1)[1] for n in os.listdir(self.upper / "store")
                if not n.startswith(".") and not n.endswith("nixfs-lower-roots")}



def _host_build(s, expr, *attrs):
    cmd = ["nix-build", "--store", f"local?root={s.root}", str(expr), "--no-out-link"]
    for a in attrs:
        cmd += ["-A", a]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=nix_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(), [line for line in proc.stderr.splitlines()
                                 if line.startswith("building ")]


def test_lower_of_a_newer_nix_serves_it_and_nix_2_8(setup):
    s = setup
    app, libb, liba = s.paths["app"], s.paths["libb"], s.paths["liba"]
    lower_hash = s.newnix.run("nix-store", "-q", "--hash", app, store=s.lower_root).stdout
    with s.mount():
        for query in (lambda *a: s.newnix.run("nix-store", *a, store=s.root),
                      lambda *a: nix(s.root, "nix-store", *a)):
            assert set(query("-q", "--references", app).stdout.split()) == {liba, libb}
            assert query("-q", "--hash", app).stdout == lower_hash
        # Builds through the mount reuse every lower path, by either Nix.
        outs, built = s.newnix.build(s.root, s.expr({"mine": ["libb"]}), "app", "mine")
        assert len(built) == 1 and "mine" in built[0], built
        outs2, built2 = _host_build(s, s.expr({"hosts": ["liba"]}), "app", "hosts")
        assert len(built2) == 1 and "hosts" in built2[0], built2
        assert {"mine", "mine.drv", "hosts", "hosts.drv"} <= s.upper_paths()
        # GC through the mount, by the newer Nix, then by 2.8: only upper paths go.
        s.newnix.run("nix-store", "--gc", store=s.root)
        assert s.upper_paths() <= {"busybox"}, s.upper_paths()
        _host_build(s, s.expr({"junk": ["app"]}), "junk")
        nix(s.root, "nix-store", "--gc")
        assert not s.upper_paths() - {"busybox"}
        for path in s.paths.values():
            assert s.new_valid(path) and s.host_valid(path)
            assert (s.mnt / path[len("/nix/"):]).exists()
        assert not [n for n in os.listdir(s.upper / "store") if n.startswith(".wh.")]
        s.newnix.run("nix-store", "--verify", "--check-contents", store=s.root)
        nix(s.root, "nix-store", "--verify", "--check-contents")


def test_a_path_the_newer_nix_adds_to_the_lower_is_valid_through_the_mount(setup):
    s = setup
    with s.mount():
        (new,), _ = s.newnix.build(s.lower_root, s.expr({"live": ["libb"]}), "live")
        wait_until(lambda: s.host_valid(new), "a new lower path valid through the mount")
        assert s.new_valid(new)
        assert (s.mnt / new[len("/nix/"):] / "bin/live").read_text().startswith("live")


def test_the_client_nix_migrates_through_the_mount_and_the_sync_goes_on(setup):
    """With ca-derivations the newer Nix runs its migration on the merged database
    (SchemaMigrations, the realisation tables) and registers realisations there; new
    lower paths still arrive, and both Nix versions keep using the store."""
    s = setup
    with s.mount():
        (ca_out,), built = s.newnix.build(s.root, s.expr({"cam": ["liba"]}, ca=True), "cam",
                                          ca=True)
        assert len(built) == 1
        with s.merged() as db:
            assert ("20220326-ca-derivations",) in db.execute(
                "select migration from SchemaMigrations").fetchall()
            assert (ca_out,) in db.execute("select v.path from Realisations r join ValidPaths v "
                                           "on v.id = r.outputPath").fetchall()
        (new,), _ = s.newnix.build(s.lower_root, s.expr({"after": ["app"]}), "after")
        wait_until(lambda: s.host_valid(new), "a new lower path valid after the client's migration")
        assert run_nixfs("sync", s.mnt).returncode == 0
        assert s.new_valid(new) and s.new_valid(ca_out)
        s.newnix.run("nix-store", "--verify", "--check-contents", ca=True, store=s.root)
        nix(s.root, "nix-store", "--verify", "--check-contents")
    with s.mount():  # and after a remount
        assert s.host_valid(new) and s.new_valid(ca_out)


def test_a_realisation_added_to_the_lower_is_used_through_the_mount(setup):
    """A content-addressed build in the lower while mounted: its realisation arrives in
    the merged database, so the same build through the mount builds nothing."""
    s = setup
    expr = s.expr({"cal": ["libb"]}, ca=True)
    with s.mount():
        (out,), built = s.newnix.build(s.lower_root, expr, "cal", ca=True)
        assert len(built) == 1

        def realised():
            with s.merged() as db:
                tables = {r[0] for r in db.execute("select name from sqlite_master")}
                return "Realisations" in tables and db.execute(
                    "select 1 from Realisations r join ValidPaths v on v.id = r.outputPath "
                    "where v.path = ?", (out,)).fetchone() is not None
        wait_until(realised, "the lower's realisation through the mount")
        again, built = s.newnix.build(s.root, expr, "cal", ca=True)
        assert again == [out] and built == []
        assert os.path.basename(out) not in os.listdir(s.upper / "store")
