"""How ``nixfs status`` prints what a daemon reports (daemon/status.py gathers it)."""


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


def _refreshed_line(r: dict | None) -> str:
    r = r or {"done": 0, "failed": 0}  # (a daemon from before the refreshing)
    if r.get("off") == "refresh_attrs=off":
        return ("  attributes the kernel marks stale after reading a listing or target: "
                "not refreshed (-o refresh_attrs=off)")
    return (f"  attributes refreshed after the kernel read a listing or target: "
            f"{r['done']} ({r['failed']} failed)")


def _generation_line(g: dict | None) -> str:
    if not g:
        return "  no published generation: the lower's database was copied into the upper"
    return (f"  built over the lower's published generation {g['generation']} "
            f"(manifest sha256 {g['manifest_sha256'][:16]}...)")


def _cow_line(c: dict) -> str:
    base = c["base"]
    return (f"  copy-on-write files: {c['open']} open ({c['opened']} opened), reads {c['read']} "
            f"({base['reads']} from their bases, {_human(base['bytes'])}), writes {c['write']}, "
            f"truncations {c['truncate']}, fsyncs {c['fsync']}")


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
    if s.get("cow_files", {}).get("opened"):  # (absent from a daemon before them)
        lines.append(_cow_line(s["cow_files"]))
    if "nix" in s:
        n = s["nix"]
        lines += [f"  Nix store: {n['lower_paths']} lower paths ({n['lower_paths_not_shown']} "
                  f"hidden), database sync lag {s['db_sync_lag_s']} s"
                  + ("" if n["last_sync_age_s"] is not None else " (not in step yet)")
                  + f", sync errors {n['sync_errors']}",
                  f"  merged database {_human(n['merged_db_bytes'])} in the upper, lower index "
                  f"{_human(n['index_bytes'])}, upper copies dropped {n['upper_copies_dropped']}"]
        lines.append(_generation_line(n.get("generation")))
        if n["last_sync_error"]:
            lines.append(f"  last sync error: {n['last_sync_error']}")
    else:
        lines.append("  no Nix database (a plain overlay)")
    return "\n".join(lines)
