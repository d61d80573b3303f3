"""scripts/walk-model: the in-process walk visits what find would, walk after walk (a
benchmark that lost entries or references would time the wrong work)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from conftest import make_lower  # noqa: E402
from nixstore import make_store  # noqa: E402

from nixfs.publish.publisher import publish  # noqa: E402

SCRIPT = TESTS.parent / "scripts/walk-model"


def _walk_model(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _find_counts(top: Path) -> dict:
    """What find sees below *top*: directories (itself too), entries, symlinks."""
    dirs = entries = links = 0
    for dirpath, dirnames, filenames in os.walk(top):
        dirs += 1
        entries += len(dirnames) + len(filenames)
        links += sum(os.path.islink(os.path.join(dirpath, n)) for n in dirnames + filenames)
    return {"dirs": dirs, "entries": entries, "links": links}


def _counts(walk: dict) -> dict:
    return {k: walk[k] for k in ("dirs", "entries", "links")}


def test_a_walk_of_a_plain_lower_visits_every_entry_each_time(tmp_path):
    lower = make_lower(tmp_path / "lower")
    out = _walk_model(lower, "--path", "dir", "--walks", "3", "--json")
    assert out.returncode == 0, out.stderr
    walks = json.loads(out.stdout)["walks"]
    assert [_counts(w) for w in walks] == [_find_counts(lower / "dir")] * 3


def test_a_walk_of_a_published_store_visits_every_store_path(tmp_path):
    root = tmp_path / "nix"
    make_store(root, 40)
    publish(str(root))
    upper = tmp_path / "upper"
    out = _walk_model(root, "--upper", upper, "--walks", "2", "--json")
    assert out.returncode == 0, out.stderr
    walks = json.loads(out.stdout)["walks"]
    # The merged store: the lower's paths and the upper's own (the GC root's path, a file).
    expected = _find_counts(root / "store")
    own = os.listdir(upper / "store")
    assert own and not any((upper / "store" / n).is_dir() for n in own)
    expected["entries"] += len(own)
    assert [_counts(w) for w in walks] == [expected] * 2
    assert expected["links"] == 1


@pytest.mark.parametrize("args", [["--walks", "0"], ["/nonexistent"], ["--path", "nothing"]])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args):
    lower = tmp_path / "lower"
    lower.mkdir()
    out = _walk_model(*(args if args[0].startswith("/") else [lower, *args]))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("walk-model: error:")
