"""The `nixfs` command: argument parsing and dispatch, nothing else."""

import argparse
import sys

from . import __version__
from .mount import MountConfig, UsageError, parse_options

COMMANDS = ("mount", "umount")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"nixfs: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nixfs", description="A userspace overlay filesystem for sharing a Nix store.")
    p.add_argument("--version", action="version", version=f"nixfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="merge a read-only lower with a writable upper at MOUNTPOINT")
    m.add_argument("--lower", required=True, help="the read-only lower directory")
    m.add_argument("--upper", required=True, help="the writable upper directory")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, e.g. allow_other,ro")
    m.add_argument("-f", "--foreground", action="store_true", help="stay attached; log to stderr")
    m.add_argument("--debug", action="store_true", help="log every request")
    m.add_argument("--log", dest="log_file", help="log file (default: UPPER/.nixfs/nixfs.log)")
    m.add_argument("--no-nix", dest="nix", action="store_false",
                   help="a plain overlay, even if the lower is a Nix state directory "
                        "(store/ and var/nix/db)")
    m.add_argument("mountpoint")

    u = sub.add_parser("umount", help="unmount and wait until everything is on disk")
    u.add_argument("--lazy", action="store_true", help="detach now even if files are open")
    u.add_argument("mountpoint")
    return p


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
    from .mount import mount
    values: dict[str, str] = {}
    options = set()
    for text in args.options:
        options |= parse_options(text, values)
    lower = args.lower or values.get("lowerdir")
    upper = args.upper or values.get("upperdir")
    if not lower or not upper:
        raise UsageError("both a lower and an upper directory are needed "
                         "(--lower/--upper, or -o lowerdir=...,upperdir=...)")
    cfg = MountConfig(lower=lower, upper=upper, mountpoint=args.mountpoint, options=options,
                      foreground=args.foreground, debug=args.debug, log_file=args.log_file,
                      ttl=values.get("ttl", 1.0), nix=args.nix and values.get("nix") != "off")
    return mount(cfg)


def _umount(args) -> int:
    from .mount import umount
    return umount(args.mountpoint, lazy=args.lazy)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        args = _helper_args(argv)
    else:
        args = _parser().parse_args(argv)
    try:
        return {"mount": _mount, "umount": _umount}[args.command](args)
    except UsageError as e:
        print(f"nixfs: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
