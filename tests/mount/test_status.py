"""`nixfs status`: lower calls, cache hits, copy-ups, database sync lag, errors, upper size."""

import json
import os

from harness import NixfsMount, run_nixfs
from nixlower import Store, built_lower  # noqa: F401 (fixture)


def status(mnt) -> tuple[dict, str]:
    js = run_nixfs("status", "--json", mnt)
    text = run_nixfs("status", mnt)
    assert js.returncode == 0 and text.returncode == 0, js.stderr + text.stderr
    return json.loads(js.stdout), text.stdout


def test_status_of_a_nix_store_mount(tmp_path, built_lower):  # noqa: F811
    store = Store(tmp_path, built_lower)
    (store.lower / "plain.txt").write_text("lower\n")
    with store.mount():
        app = store.mnt / store.paths["app"][len("/nix/"):]
        for _ in range(3):  # the first walk fetches listings, the others hit the cache
            for dirpath, dirnames, filenames in os.walk(app):
                for name in filenames:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        f.read()
        os.chmod(store.mnt / "plain.txt", 0o600)  # a copy-up
        try:
            os.stat(store.mnt / "store/nope")
        except FileNotFoundError:
            pass
        store.wait(lambda: status(store.mnt)[0]["db_sync_lag_s"] < 2, "sync lag below 2 s")
        s, text = status(store.mnt)
    assert sum(s["lower_calls"].values()) > 0
    assert s["cache"]["hits"] > 0 and 0 < s["cache"]["hit_ratio"] <= 1
    assert s["copy_ups"] == 1
    assert 0 <= s["db_sync_lag_s"] < 2
    assert s["errors"] == 0  # internal errors (answered EIO); ENOENT is an answer, not one
    assert s["nix"]["sync_errors"] == 0
    assert s["upper_bytes"] >= os.path.getsize(store.upper / "var/nix/db/db.sqlite")
    for words in ("lower calls", "hit ratio", "copy-ups 1", "database sync lag", "errors",
                  str(store.upper)):
        assert words in text, (words, text)


def test_status_of_a_plain_mount(lower, upper, mnt):
    with NixfsMount(lower, upper, mnt):
        (mnt / "new").write_text("x")
        s, text = status(mnt)
    assert s["db_sync_lag_s"] is None and "nix" not in s
    assert s["copy_ups"] == 0  # nothing of the lower changed
    assert "no Nix database" in text
