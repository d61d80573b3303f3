"""What ``nixfs status`` reports: gathered in the daemon, printed by the command."""

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


def collect(*, cfg, ops, overlay, service, started: float, poll_us: int = 0) -> dict:
    """The daemon's view of itself (runs in a worker thread: it walks the upper)."""
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
        from .nixdb.merged import db_size
        index = overlay.policy.index
        last = service.last_ok
        out["nix"] = {
            "lower_paths": index.count(),
            "lower_paths_not_shown": index.not_shown_count(),
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


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _kept_line(k: dict) -> str:
    if not k["available"]:
        return "  attributes kept in pyfuse3: no (pyfuse3 without nixfs' patch)"
    return (f"  attributes kept in pyfuse3: {k['inodes']} directories and symlinks, "
            f"{k['getattr_answered']} GETATTRs answered from them, "
            f"{k.get('readdir_ends_answered', 0)} listings' closing READDIRPLUS answered")


def _refreshed(stale_attrs) -> dict:
    if stale_attrs is None:
        return {"done": 0, "failed": 0}
    return {"done": stale_attrs.refreshed, "failed": stale_attrs.failed}


def _refreshed_line(r: dict | None) -> str:
    r = r or {"done": 0, "failed": 0}  # (a daemon from before the refreshing)
    return (f"  attributes refreshed after the kernel read a listing or target: "
            f"{r['done']} ({r['failed']} failed)")


def render(s: dict) -> str:
    lines = [f"{s['mountpoint']}  (pid {s['pid']}, up {s['uptime_s']} s)",
             f"  lower  {s['lower']}", f"  upper  {s['upper']}  ({_human(s['upper_bytes'])})",
             f"  FUSE requests {sum(s['fuse_requests'].values())}, errors {s['errors']}, "
             f"copy-ups {s['copy_ups']}, nodes {s['nodes']}, memory {_human(s['rss_bytes'])}",
             "  lower calls " + (", ".join(f"{k} {v}" for k, v in sorted(s["lower_calls"].items()))
                                 or "none")
             + (f" (timeout {s['lower_timeout_s']} s)" if s.get("lower_timeout_s") else ""),
             f"  kernel keeps listings: {s['kernel_listings']}; opens kept by {s['opens']}; xattrs "
             f"{'on' if s['xattrs'] else 'off'}; polls /dev/fuse {s['poll_us']} µs after a request",
             _kept_line(s["kept_attributes"]),
             _refreshed_line(s.get("attributes_refreshed")),
             f"  lower listings kept: {s['cache']['listings']} in memory, hits {s['cache']['hits']}, "
             f"from disk {s['cache']['loaded_from_disk']}, fetched {s['cache']['misses']}"
             + ("" if s["cache"]["hit_ratio"] is None
                else f" (hit ratio {100 * s['cache']['hit_ratio']:.0f}%)")]
    if "nix" in s:
        n = s["nix"]
        lines += [f"  Nix store: {n['lower_paths']} lower paths ({n['lower_paths_not_shown']} "
                  f"hidden), database sync lag {s['db_sync_lag_s']} s"
                  + ("" if n["last_sync_age_s"] is not None else " (not in step yet)")
                  + f", sync errors {n['sync_errors']}",
                  f"  merged database {_human(n['merged_db_bytes'])} in the upper, lower index "
                  f"{_human(n['index_bytes'])}, upper copies dropped {n['upper_copies_dropped']}"]
        if n["last_sync_error"]:
            lines.append(f"  last sync error: {n['last_sync_error']}")
    else:
        lines.append("  no Nix database (a plain overlay)")
    return "\n".join(lines)
