"""What ``nixfs status`` reports, gathered in the daemon from its parts.

nixfs/status.py prints it; tests and scripts read its keys (``status --json``).
"""

import os
import time


def tree_size(path: str, skip: str | None = None) -> int:
    """Bytes allocated below *path* (not following symlinks)."""
    total = 0
    stack = [path]
    while stack:
        top = stack.pop()
        try:
            entries = os.scandir(top)
        except OSError:
            continue
        with entries:
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_blocks * 512
                if e.is_dir(follow_symlinks=False) and e.path != skip:
                    stack.append(e.path)
    return total


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def collect(daemon, *, started: float, poll_us: int = 0) -> dict:
    """The daemon's view of itself: each part's own ``stats()``, merged under the keys
    ``nixfs status --json`` has always had.  Runs on the trio thread, where the parts live
    (their SQLite connections are not to be used from two threads at once: a status taken
    in a worker thread once made a store listing fail); the sizes on disk, a walk of the
    upper, are ``add_sizes``' in a worker thread."""
    cfg = daemon.cfg
    ops, model = daemon.ops.stats(), daemon.overlay.stats()
    uptime = round(time.time() - started, 1)
    out = {
        "mountpoint": cfg.mountpoint, "lower": cfg.lower, "upper": cfg.upper,
        "pid": os.getpid(), "uptime_s": uptime,
        "fuse_requests": ops["fuse_requests"], "errors": ops["errors"],
        **_keys(model, "lower_calls", "upper_calls", "lower_timeout_s"),
        **_keys(ops, "kernel_listings", "opens", "xattrs"),
        "poll_us": poll_us,
        "kept_attributes": ops["kept_attributes"],
        # "off": why nothing is refreshed (a read-only mount holds nothing stale).
        "attributes_refreshed": (daemon.stale_attrs.stats() if daemon.stale_attrs is not None
                                 else {"done": 0, "failed": 0,
                                       "off": "read-only" if cfg.readonly else "refresh_attrs=off"}),
        **_keys(model, "copy_ups", "stale_answers", "nodes", "nodes_trimmed",
                "entries_without_node"),
        "rss_bytes": _rss(),
        **_keys(model, "open_dir_fds", "shared_lower_files", "node_file_fds", "cache",
                "cow_files"),
        "upper_bytes": None,  # add_sizes
        "db_sync_lag_s": None,
    }
    if daemon.service is not None:
        nix = {**daemon.policy.stats(), **daemon.service.stats(), "merged_db_bytes": None}
        out["nix"] = _keys(nix, "lower_paths", "lower_paths_not_shown", "lower_max_id",
                           "index_queries",
                           "merged_db_bytes", "index_bytes", "last_sync_age_s", "sync_errors",
                           "last_sync_error", "upper_copies_dropped", "first_build_finishing",
                           "generation")
        # How far behind the lower the merged database may be: the time since a sync round
        # last found it in step (rounds run every half second; this grows while they fail).
        age = out["nix"]["last_sync_age_s"]
        out["db_sync_lag_s"] = age if age is not None else uptime
    return out


def add_sizes(out: dict, upper: str) -> dict:
    """*out* (``collect``'s) with what the upper and its merged database take on disk: a
    walk of the upper, for a worker thread (it touches no part of the daemon)."""
    out["upper_bytes"] = tree_size(upper)
    if "nix" in out:
        from ..nixdb.merged import db_size
        out["nix"]["merged_db_bytes"] = db_size(os.path.join(upper, "var/nix/db"))
    return out


def _keys(stats: dict, *names: str) -> dict:
    return {name: stats[name] for name in names}
