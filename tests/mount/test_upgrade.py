"""Uppers written by an earlier nixfs keep working: mounted by this one, served as they
were left, never converted or refused (docs/design.md, "The upper's format")."""

import os
import subprocess
from pathlib import Path

from harness import NixfsMount, run_nixfs
from nixstore import nix
from relharness import synthetic_store

FIXTURE = Path(__file__).parent.parent / "fixtures" / "format1-nix-upper.tar.gz"
OWN = "/nix/store/mzrzq9gxdfww2carl3ppv5lj1jvq4xyr-own.txt"
REMOVED = "l0ijwm7psxybskmsqb72af7wyycvc7p7-pkg19"


def test_an_upper_of_the_last_format_mounts_as_it_was_left(tmp_path):
    """The fixture is the upper the tenth session's nixfs (a9f954b, format 1, before
    generations) wrote over ``synthetic_store(count=20)``: an own path added with
    ``nix-store --add``, a lower path removed with ``rm -rf`` through the mount, a few
    listings learnt.  With a generation published beside it since, this nixfs serves it
    as it is: its copied database stays a plain file, its format stays 1, its own path
    is valid, the removed one stays gone and every other lower path is valid."""
    names = synthetic_store(tmp_path / "L/nix", count=20)
    assert REMOVED in names
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xzf", FIXTURE, "-C", tmp_path],
                   check=True)
    upper, root = tmp_path / "upper", tmp_path / "M"
    assert (upper / ".nixfs/format").read_bytes() == b"1\n"
    proc = run_nixfs("publish", tmp_path / "L/nix")
    assert proc.returncode == 0, proc.stderr
    (root / "nix").mkdir(parents=True)
    with NixfsMount(tmp_path / "L/nix", upper, root / "nix"):
        assert nix(root, "nix-store", "-q", "--hash", OWN).stdout.startswith("sha256:")
        assert (root / OWN[1:]).read_text() == "own file for the fixture\n"
        gone = nix(root, "nix-store", "-q", "--hash", f"/nix/store/{REMOVED}", check=False)
        assert gone.returncode != 0 and "is not valid" in gone.stderr
        assert REMOVED not in os.listdir(root / "nix/store")
        kept = [f"/nix/store/{n}" for n in names if n != REMOVED]
        assert len(nix(root, "nix-store", "-q", "--hash", *kept).stdout.split()) == len(kept)
        assert nix(root, "nix-store", "--verify").returncode == 0
    assert (upper / ".nixfs/format").read_bytes() == b"1\n"
    assert not (upper / "var/nix/db/.wh..wh..nixfs-cow.db.sqlite").exists()
    assert not (upper / ".nixfs/generation").exists()


def test_an_upper_that_takes_copy_on_write_files_becomes_format_2(tmp_path):
    """An upper that holds copy-on-write files is format 2, which a nixfs of format 1
    refuses instead of reading the bare deltas as a database: one of format 1 with no
    database yet (an earlier nixfs left it before a first build) is marked so as its
    database is built over the generation."""
    synthetic_store(tmp_path / "L/nix", count=5)
    assert run_nixfs("publish", tmp_path / "L/nix").returncode == 0
    upper, root = tmp_path / "upper", tmp_path / "M"
    (upper / ".nixfs").mkdir(parents=True)
    (upper / ".nixfs/format").write_bytes(b"1\n")
    (root / "nix").mkdir(parents=True)
    with NixfsMount(tmp_path / "L/nix", upper, root / "nix"):
        pass
    assert (upper / ".nixfs/generation").exists()
    assert (upper / ".nixfs/format").read_bytes() == b"2\n"
