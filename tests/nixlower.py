"""A lower Nix store built once by a real Nix (liba <- libb <- app), and a mountable copy
of it: shared by the mount and system tiers (a fixture imported where it is used)."""

import subprocess

import pytest
from harness import NixfsMount, wait_until
from nixstore import busybox_dir, derivations_nix, nix, nix_build

LOWER_DRVS = {"liba": [], "libb": ["liba"], "app": ["liba", "libb"]}


@pytest.fixture(scope="session")
def built_lower(tmp_path_factory):
    """A lower store built once by Nix: liba <- libb <- app."""
    base = tmp_path_factory.mktemp("nixlower")
    bb = busybox_dir(base)
    expr = base / "lower.nix"
    expr.write_text(derivations_nix(bb, LOWER_DRVS))
    outs = nix_build(base / "L", expr, *LOWER_DRVS)
    return base, dict(zip(LOWER_DRVS, outs))


class Store:
    """A copy of the built lower, an upper, and a mountpoint at ROOT/nix."""

    def __init__(self, tmp_path, built_lower):
        base, self.paths = built_lower
        self.busybox = base / "busybox"
        self.lower_root = tmp_path / "L"
        subprocess.run(["cp", "-a", str(base / "L"), str(self.lower_root)], check=True)
        self.lower = self.lower_root / "nix"
        self.upper = tmp_path / "upper"
        self.root = tmp_path / "M"
        self.mnt = self.root / "nix"
        self.upper.mkdir()
        self.mnt.mkdir(parents=True)
        self.tmp = tmp_path

    def mount(self, *options):
        return NixfsMount(self.lower, self.upper, self.mnt, *options)

    def expr(self, names: dict):
        """An expression with the lower's derivations and *names* (which may use them)."""
        f = self.tmp / f"expr-{'-'.join(names)}.nix"  # one per set of names: thread-safe
        f.write_text(derivations_nix(self.busybox, {**LOWER_DRVS, **names}))
        return f

    def q(self, *args, check=True):
        return nix(self.root, "nix-store", *args, check=check)

    def valid(self, path) -> bool:
        return self.q("--check-validity", path, check=False).returncode == 0

    def lower_valid(self, path) -> bool:
        return nix(self.lower_root, "nix-store", "--check-validity", path, check=False).returncode == 0

    def wait(self, cond, what, timeout=2.0):
        """Poll *cond* for up to *timeout* seconds (the issue's bound), failing if not met."""
        return wait_until(cond, what, timeout)
