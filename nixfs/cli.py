"""The `nixfs` command: argument parsing and dispatch, nothing else."""

import argparse
import os
import signal
import sys

from . import __version__
from .config import MountConfig, RunConfig, parse_options
from .usage import UsageError

COMMANDS = ("mount", "umount", "run", "status", "sync", "unhide", "gc", "promote", "fsck",
            "publish")

FSCK_EPILOG = """exit codes: 0 clean (no damage; redundant leftovers may be listed, and --repair
tidies them), 1 damage found and all of it repaired, 4 damage left (found without --repair, or
not repairable), 2 usage errors (e.g. the upper is mounted)."""

RUN_EPILOG = """exit codes: COMMAND's (128 + N if signal N ended it), 127 COMMAND not found,
126 COMMAND cannot be run, 125 COMMAND could not be started in the new root (pivot_root and
chroot refused: the message says why), 2 the machine lacks what nixfs run needs (/dev/fuse,
user namespaces) or bad arguments."""

OPTIONS_EPILOG = """nixfs' own -o options: ttl=SECONDS (1: how long the kernel keeps what may
change), lower_timeout=SECONDS (30; 0 waits forever), max_nodes=N (100000),
listings=kernel|fixed|none (which listings the kernel keeps), opens=kernel|nixfs (who
keeps opens of files: the kernel sends no OPEN/RELEASE), poll_us=N (250 with 2+ CPUs:
how long to poll for the next request), xattr=on|off (off for a Nix store),
generation=auto|off (auto: a fresh upper starts from the lower's newest published
generation), nix=off (as --no-nix), owner_only (a root mount is for every user unless this is given; a user's is
theirs alone unless allow_other is). Others: allow_other, ro, nosuid, nodev, noatime, ...
(see README.md)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"nixfs: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nixfs", description="A userspace overlay filesystem for sharing a Nix store.")
    p.add_argument("--version", action="version", version=f"nixfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_mount_args, _run_args, _umount_args, _status_args, _sync_args, _unhide_args,
                _gc_args, _promote_args, _fsck_args, _publish_args):
        add(sub)
    return p


def _layer_args(p: argparse.ArgumentParser, lower_help: str, options_help: str) -> None:
    """What nixfs mount and nixfs run share: the layers, -o, logging, --no-nix."""
    p.add_argument("--lower", required=True, help=lower_help)
    p.add_argument("--upper", required=True, help="the writable upper directory")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help=options_help)


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument("--log", dest="log_file", help="log file (default: UPPER/.nixfs/nixfs.log)")


def _mount_args(sub) -> None:
    m = sub.add_parser("mount", help="merge a read-only lower with a writable upper at MOUNTPOINT",
                       epilog=OPTIONS_EPILOG)
    _layer_args(m, "the read-only lower directory", "mount options, e.g. allow_other,ro")
    m.add_argument("-f", "--foreground", action="store_true", help="stay attached; log to stderr")
    _log_args(m)
    m.add_argument("--no-nix", dest="nix", action="store_false",
                   help="a plain overlay, even if the lower is a Nix state directory "
                        "(store/ and var/nix/db)")
    m.add_argument("mountpoint")


def _run_args(sub) -> None:
    r = sub.add_parser("run", help="run COMMAND with nixfs mounted at /nix, as an ordinary "
                                   "user (in a user and mount namespace of its own)",
                       epilog=RUN_EPILOG + "\n\n" + OPTIONS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _layer_args(r, "the read-only lower (a Nix directory, holding store/ and var/nix/db)",
                "mount options, as for nixfs mount")
    _log_args(r)
    r.add_argument("--no-nix", dest="nix", action="store_false",
                   help="a plain overlay at /nix, even if the lower is a Nix directory")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="[--] COMMAND [ARGS...]")


def _umount_args(sub) -> None:
    u = sub.add_parser("umount", help="unmount and wait until everything is on disk")
    u.add_argument("--lazy", action="store_true", help="detach now even if files are open")
    u.add_argument("mountpoint")


def _status_args(sub) -> None:
    st = sub.add_parser("status", help="what a mount's daemon is doing")
    st.add_argument("--json", action="store_true", help="machine-readable")
    st.add_argument("mountpoint")


def _sync_args(sub) -> None:
    sy = sub.add_parser("sync", help="make a Nix store mount's database catch up with the "
                                     "lower now (it does within a second anyway)")
    sy.add_argument("mountpoint")


def _unhide_args(sub) -> None:
    uh = sub.add_parser("unhide", help="show lower store paths removed through a mount again")
    uh.add_argument("--mount", dest="mountpoint",
                    help="the nixfs mount (default: the only Nix store mount there is)")
    uh.add_argument("paths", nargs="+", metavar="STOREPATH",
                    help="/nix/store/HASH-NAME, or just HASH-NAME")


def _gc_args(sub) -> None:
    g = sub.add_parser("gc", help="free dead upper paths of a Nix store mount (cost grows "
                                  "with the upper, not the lower)")
    g.add_argument("--dry-run", action="store_true", help="only print what would go")
    g.add_argument("mountpoint")


def _promote_args(sub) -> None:
    pr = sub.add_parser("promote", help="move valid upper paths (with the upper part of their "
                                        "closure) into a writable lower store")
    pr.add_argument("--upper", required=True)
    pr.add_argument("--into", required=True, metavar="LOWER", help="the lower Nix directory")
    pr.add_argument("paths", nargs="*", metavar="STOREPATH", help="default: every upper path")


def _fsck_args(sub) -> None:
    fs = sub.add_parser("fsck", help="check an unmounted upper (and repair it with --repair)",
                        description="Check an unmounted upper: temporaries, whiteouts, opaque "
                                    "and redirect markers, nixfs' state folder, and for a Nix "
                                    "store the merged database against the files.",
                        epilog=FSCK_EPILOG)
    fs.add_argument("--lower", required=True, help="the lower directory the upper belongs to")
    fs.add_argument("--upper", required=True, help="the upper directory to check")
    fs.add_argument("--repair", action="store_true", help="repair what can be (in the upper only)")
    fs.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    fs.add_argument("--no-nix", dest="nix", action="store_false",
                    help="skip the Nix database checks (the upper of a --no-nix mount)")


PUBLISH_EPILOG = """Generations go to STORE/var/nixfs/generations/N (only that directory is
written; no root needed); the newest complete one is what nixfs mount and nixfs run of the
store use.  Without --list, a new generation is written if the store's database changed
since the newest one (or with --force).  exit codes: 0 done, 1 the store's database could
not be read or written, 2 bad arguments."""


def _publish_args(sub) -> None:
    pu = sub.add_parser("publish", help="publish a generation of a shared store for "
                                        "fresh uppers to start from",
                        description="Write an immutable generation of a Nix store: its "
                                    "database with nixfs' GC root, the lower index and the "
                                    "catalog of its listings.",
                        epilog=PUBLISH_EPILOG)
    pu.add_argument("store", metavar="STORE", help="the store directory (holding store/ "
                                                    "and var/nix), e.g. /nix")
    pu.add_argument("--list", action="store_true", help="list the generations and do nothing else")
    pu.add_argument("--json", action="store_true", help="machine-readable output")
    pu.add_argument("--keep", type=_count, metavar="N",
                    help="then remove all but the newest N generations (and their bases)")
    pu.add_argument("--force", action="store_true",
                    help="publish even if nothing changed since the newest generation")
    pu.add_argument("--full", action="store_true",
                    help="write the generation whole, not copy-on-write over the newest")
    pu.add_argument("--follow", action="store_true",
                    help="keep publishing whenever the store's database changes, until "
                         "SIGINT or SIGTERM")
    pu.add_argument("--interval", type=_seconds, default=2.0, metavar="S",
                    help="with --follow: how often to look at the database (2 s)")


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a count of generations (1 or more): {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = -1.0
    if not 0.01 <= s <= 86400:
        raise argparse.ArgumentTypeError(f"not an interval in seconds: {text!r}")
    return s


def _is_helper_call(argv: list[str]) -> bool:
    """Whether *argv* is how mount.fuse3 (mount(8), fstab, systemd's mount units) runs
    its helper: ``SOURCE MOUNTPOINT -o OPTIONS``, the mountpoint absolute and the
    options always there (mount(8) passes at least ``rw`` or ``ro``).  Anything else
    whose first word is not a command is a typo, not a mount."""
    return (len(argv) >= 4 and not argv[0].startswith("-") and argv[1].startswith("/")
            and "-o" in argv[2:])


def _unknown_command(word: str) -> int:
    import difflib
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    print(f"nixfs: unknown command '{word}': {hint}commands: {', '.join(COMMANDS)} "
          "(nixfs --help, nixfs COMMAND --help)", file=sys.stderr)
    return 2


def _helper_args(argv: list[str]) -> argparse.Namespace:
    """mount.fuse3 calls ``nixfs SOURCE MOUNTPOINT -o lowerdir=L,upperdir=U,...``."""
    p = _Parser(prog="nixfs", description="mount helper form (mount -t fuse.nixfs)")
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-f", "--foreground", action="store_true")
    args = p.parse_args(argv)
    args.command, args.lower, args.upper, args.debug, args.log_file = "mount", None, None, False, None
    args.nix = True
    return args


def _mount(args) -> int:
    from .daemon.start import exit_now, mount
    values: dict[str, str] = {}
    options = set()
    for text in args.options:
        options |= parse_options(text, values)
    lower = args.lower or values.get("lowerdir")
    upper = args.upper or values.get("upperdir")
    if not lower or not upper:
        raise UsageError("both a lower and an upper directory are needed "
                         "(--lower/--upper, or -o lowerdir=...,upperdir=...)")
    cfg = MountConfig.from_values(
        values, lower=lower, upper=upper, mountpoint=args.mountpoint, options=options,
        foreground=args.foreground, debug=args.debug, log_file=args.log_file,
        nix=args.nix and values.get("nix") != "off")
    # Once the daemon serves, this process has nothing left to do: it ends at once.
    return mount(cfg) if cfg.foreground else exit_now(mount(cfg))


def _run(args) -> int:
    from .run.runner import run
    values: dict[str, str] = {}
    options = set()
    for text in args.options:
        options |= parse_options(text, values)
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    cfg = RunConfig(lower=args.lower, upper=args.upper, command=command, options=options,
                    values=values, nix=args.nix and values.get("nix") != "off",
                    debug=args.debug, log_file=args.log_file)
    return run(cfg)


def _umount(args) -> int:
    from .daemon.unmount import umount
    return umount(args.mountpoint, lazy=args.lazy)


def _status(args) -> int:
    import json

    from . import control, status
    result = control.request(args.mountpoint, "status")
    print(json.dumps(result, indent=2) if args.json else status.render(result))
    return 0


def _sync(args) -> int:
    from . import control
    _record_of(args.mountpoint)
    control.request(args.mountpoint, "sync")
    return 0


def _nix_mounts() -> list[str]:
    from . import runtime
    return [m.mountpoint for m in runtime.mounts() if m.fstype == runtime.FSTYPE
            and (runtime.read_record(m.mountpoint) or {}).get("nix")]


def _unhide(args) -> int:
    from . import control
    mnt = args.mountpoint
    if mnt is None:
        mounts = _nix_mounts()
        if len(mounts) != 1:
            raise UsageError("say which mount with --mount (nixfs Nix store mounts here: "
                             f"{', '.join(mounts) or 'none'})")
        mnt = mounts[0]
    names = []
    for path in args.paths:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if len(name) < 34 or name[32] != "-":
            raise UsageError(f"not a store path: {path}")
        names.append(name)
    shown = control.request(mnt, "unhide", names=names)
    for name in shown:
        print(f"/nix/store/{name}")
    return 0


def _record_of(mountpoint: str) -> dict:
    from . import runtime
    info = runtime.read_record(mountpoint)
    if info is None or not info.get("nix"):
        raise UsageError(f"{mountpoint} is not a nixfs mount of a Nix store")
    return info


def _gc(args) -> int:
    from .nixdb.gc import collect
    info = _record_of(args.mountpoint)
    paths, total = collect(info["mountpoint"], info["upper"], dry_run=args.dry_run)
    for p in paths:
        print(p)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"nixfs: {verb} {len(paths)} of {total} upper paths", file=sys.stderr)
    return 0


def _promote(args) -> int:
    import os

    from . import control, runtime
    from .nixdb.promote import promote
    upper = os.path.realpath(args.upper)
    mounted = None
    for m in runtime.mounts():
        info = runtime.read_record(m.mountpoint) if m.fstype == runtime.FSTYPE else None
        if info and info.get("upper") == upper:
            mounted = info["mountpoint"]
    # While mounted, the merged database is only read through the mount.
    db_root = mounted or os.path.join(upper)
    merged = os.path.join(db_root, "var/nix/db/db.sqlite")
    if not os.path.exists(merged):
        raise UsageError(f"{args.upper} holds no merged Nix database")
    moved = promote(upper, os.path.realpath(args.into), merged, args.paths or None)
    for p in moved:
        print(p)
    if mounted:
        control.request(mounted, "sync")
    print(f"nixfs: promoted {len(moved)} paths into {args.into}", file=sys.stderr)
    return 0


def _fsck(args) -> int:
    import json

    from .fsck.progress import Progress
    from .fsck.run import fsck
    report = fsck(args.lower, args.upper, repair=args.repair, nix=args.nix,
                  progress=Progress())
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return report.exit_code


def _publish(args) -> int:
    from .publish.command import publish_command
    return publish_command(args)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader went away (`nixfs status | head -1`): quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        if not _is_helper_call(argv):
            return _unknown_command(argv[0])
        args = _helper_args(argv)
    else:
        args = _parser().parse_args(argv)
    from .control import ControlError
    from .nixdb.gc import GcError
    from .nixdb.promote import PromoteError
    from .nixdb.schema import SchemaError
    try:
        return {"mount": _mount, "run": _run, "umount": _umount, "status": _status, "sync": _sync,
                "unhide": _unhide, "gc": _gc, "promote": _promote,
                "fsck": _fsck, "publish": _publish}[args.command](args)
    except (UsageError, SchemaError, PromoteError) as e:
        print(f"nixfs: {e}", file=sys.stderr)
        return 2
    except (ControlError, GcError) as e:
        print(f"nixfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
