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
    """The daemon's view of itself (runs in a worker thread: it walks the upper)."""
    cfg, ops, overlay, service = daemon.cfg, daemon.ops, daemon.overlay, daemon.service
    lower, upper = overlay.lower.layer, overlay.upper
    out = {
        "mountpoint": cfg.mountpoint, "lower": cfg.lower, "upper": cfg.upper,
        "pid": os.getpid(), "uptime_s": round(time.time() - started, 1),
        "fuse_requests": dict(ops.requests), "errors": ops.errors,
        "lower_calls": dict(lower.calls), "upper_calls": dict(upper.calls),
        "lower_timeout_s": overlay.lower.timeout or 0,
        "kernel_listings": ops.listings, "opens": ops.opens, "xattrs": ops.xattrs,
        "poll_us": poll_us,
        "kept_attributes": ops.kept_attributes(),
        "attributes_refreshed": _refreshed(ops.stale_attrs),
        "copy_ups": overlay.copy_ups, "stale_answers": overlay.stale_answers,
        "nodes": len(overlay.inodes), "nodes_trimmed": overlay.trims,
        "rss_bytes": _rss(),
        "open_dir_fds": len(overlay.fds), "shared_lower_files": len(overlay.lower_files),
        "node_file_fds": len(overlay.file_fds),
        "cache": {"hits": overlay.dircache.hits, "misses": overlay.dircache.misses,
                  "loaded_from_disk": overlay.dircache.loads, "listings": len(overlay.dircache),
                  "bytes_on_disk": overlay.dircache.store.size_bytes()
                  if overlay.dircache.store else 0},
        "upper_bytes": tree_size(cfg.upper),
        "db_sync_lag_s": None,
    }
    cache = out["cache"]
    asked = cache["hits"] + cache["loaded_from_disk"] + cache["misses"]
    # Answered without a lower call (memory or the on-disk copy), of every cacheable listing asked.
    cache["hit_ratio"] = (round((cache["hits"] + cache["loaded_from_disk"]) / asked, 3)
                          if asked else None)
    if service is not None:
        from ..nixdb.merged import db_size
        index = overlay.policy.index
        last = service.last_ok
        out["nix"] = {
            "lower_paths": index.count(),
            "lower_paths_not_shown": index.conn.execute(
                "select count(*) from paths where state != 0").fetchone()[0],
            "lower_max_id": index.get("lower_max_id", 0),
            "merged_db_bytes": db_size(os.path.join(cfg.upper, "var/nix/db")),
            "index_bytes": index.size_bytes(),
            "last_sync_age_s": round(time.time() - last, 1) if last else None,
            "sync_errors": service.errors, "last_sync_error": service.last_error,
            "upper_copies_dropped": service.duplicates,
            "first_build_finishing": service.finish_pending,
        }
        # How far behind the lower the merged database may be: the time since a sync round
        # last found it in step (rounds run every half second; this grows while they fail).
        out["db_sync_lag_s"] = round(time.time() - (last or started), 1)
    return out


def _refreshed(stale_attrs) -> dict:
    if stale_attrs is None:
        return {"done": 0, "failed": 0}
    return {"done": stale_attrs.refreshed, "failed": stale_attrs.failed}


