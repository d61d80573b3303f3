"""Copy-up is atomic also when the daemon dies in the middle of one."""

import hashlib
import os
import threading
import time

from harness import NixfsMount, force_unmount, kill_daemon


def _big_file(path, size):
    block = hashlib.sha256(b"nixfs").digest() * (1 << 15)  # 1 MiB, not sparse
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)


def test_kill_during_copy_up_leaves_old_content(tmp_path, upper, mnt):
    lower = tmp_path / "lower"
    lower.mkdir()
    work = upper / ".nixfs/work"
    size = 256 << 20
    for attempt in range(4):
        _big_file(lower / "big", size)
        expected = hashlib.sha256((lower / "big").read_bytes()).hexdigest()
        m = NixfsMount(lower, upper, mnt).start()
        try:
            def copy_up():
                try:
                    os.chmod(mnt / "big", 0o600)  # any change copies up
                except OSError:
                    pass
            t = threading.Thread(target=copy_up)
            t.start()
            caught = False
            while t.is_alive():
                if any(n.startswith("tmp.") for n in os.listdir(work)):
                    kill_daemon(mnt)
                    caught = True
                    break
                time.sleep(0.0005)
            t.join()
        finally:
            force_unmount(mnt)
        if not caught:  # the copy won the race: try a bigger file
            os.unlink(upper / "big")
            size *= 2
            continue
        assert not (upper / "big").exists(), "a partial copy became visible"
        assert os.listdir(work), "the interrupted copy should still be in the work folder"
        with NixfsMount(lower, upper, mnt):
            assert os.listdir(work) == []  # the new daemon removed the leftover
            assert hashlib.sha256((mnt / "big").read_bytes()).hexdigest() == expected
            os.chmod(mnt / "big", 0o600)
            assert hashlib.sha256((upper / "big").read_bytes()).hexdigest() == expected
        return
    raise AssertionError("never caught a copy-up in progress")
