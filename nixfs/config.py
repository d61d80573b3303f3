"""What a mount is asked to be: ``MountConfig`` and the ``-o`` options that fill it.

The command line (``nixfs mount``, ``nixfs run``, the ``mount.fuse3`` helper form) and
fstab all reach a mount through these options, so they are parsed and checked in one
place; the daemon's parts are built from the config (see daemon/assemble.py).
"""

from dataclasses import dataclass, field

from .usage import UsageError

# Mount options nixfs hands to FUSE / the kernel.
FUSE_OPTIONS = {
    "allow_other", "allow_root", "auto_unmount", "ro", "rw", "suid", "nosuid", "dev", "nodev",
    "exec", "noexec", "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime",
    "strictatime", "nostrictatime", "lazytime", "nolazytime", "sync", "async", "dirsync",
}
# nixfs' own flags: owner_only keeps a root mount to root (a root mount is for everyone).
OWN_FLAGS = {"owner_only"}
# nixfs' own -o key=value options that set the MountConfig field of the same name.
VALUE_FIELDS = ("ttl", "max_nodes", "listings", "opens", "lower_timeout", "poll_us", "xattr",
                "generation", "refresh_attrs")
# What mount(8) and fstab add that is not for the file system.
IGNORED_OPTIONS = {"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
                   "nofail", "_netdev", "default_permissions"}


@dataclass
class MountConfig:
    lower: str
    upper: str
    mountpoint: str
    options: set[str] = field(default_factory=set)
    foreground: bool = False
    debug: bool = False
    log_file: str | None = None
    ttl: float = 1.0
    nix: bool = True  # treat a lower holding store/ and var/nix/db as a Nix store
    max_nodes: int = 100_000  # inodes kept before asking the kernel to forget old ones
    listings: str = "best"  # which directory listings the kernel keeps: kernel/fixed/none
    opens: str = "best"  # who keeps opens of files: kernel (no OPEN/RELEASE) or nixfs
    quiet: bool = False  # no announcement on stdout (nixfs run: stdout is the command's)
    exit_with_parent: bool = False  # the daemon unmounts when the process that mounted dies
    # Seconds a lower call may take before it fails with EIO (a hung NFS server must not
    # hang the mount); 0 waits forever.
    lower_timeout: float = 30.0
    # Microseconds the daemon polls /dev/fuse for the next request before sleeping (a
    # round trip without a wake-up is several times faster); -1: decide by the CPUs.
    poll_us: int = -1
    # Extended attributes through the mount: "on", "off" (the kernel is told once that there
    # are none and never asks again), or "auto": off for a Nix store, on otherwise.
    xattr: str = "auto"
    # A Nix store lower's published generation (``nixfs publish``): "auto" builds a fresh
    # upper's database over the newest usable one (and rebases onto a newer one at a
    # mount); "off" copies the lower's database as before.
    generation: str = "auto"
    # "on": the daemon refreshes the attributes the kernel marks stale after reading a
    # store directory's listing or a symlink's target (fuse/stale_attrs.py), so a second
    # walk asks nothing; "off" spares the first walk those requests (a job that walks the
    # store once), and a second walk then asks a GETATTR for each such object.
    refresh_attrs: str = "on"

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    @classmethod
    def from_values(cls, values: dict, **fields) -> "MountConfig":
        """A config with the -o key=value options in *values* (as given: checked when mounting)."""
        given = {k: values[k] for k in VALUE_FIELDS if k in values}
        return cls(**given, **fields)


@dataclass
class RunConfig:
    """``nixfs run``: the layers, the command, and the mount's options as given."""
    lower: str
    upper: str
    command: list[str]
    options: set[str] = field(default_factory=set)
    values: dict = field(default_factory=dict)  # nixfs' own -o key=value options
    nix: bool = True
    debug: bool = False
    log_file: str | None = None


def parse_options(text: str, cfg_values: dict) -> set[str]:
    """Split ``-o a,b=c`` into FUSE options; nixfs' own ``key=value`` go to *cfg_values*."""
    out = set()
    for opt in filter(None, (o.strip() for o in text.split(","))):
        key, _, value = opt.partition("=")
        if key in ("lowerdir", "upperdir", "nix", *VALUE_FIELDS):
            cfg_values[key] = value
        elif opt in FUSE_OPTIONS or opt in OWN_FLAGS:
            out.add(opt)
        elif opt in IGNORED_OPTIONS or key in ("comment", "fsname", "subtype") or key.startswith("x-"):
            continue
        else:
            raise UsageError(f"unknown mount option: {opt}")
    return out


def _number(value, kind, ok, message: str):
    """*value* as *kind* if *ok* says it is in range; UsageError with *message* if not."""
    try:
        number = kind(value)
        if not ok(number):
            raise ValueError
    except ValueError:
        raise UsageError(f"{message}, not {value!r}") from None
    return number


def _choice(value: str, name: str, choices: tuple, shown: str) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be {shown}, not {value!r}")


def check_values(cfg: MountConfig) -> None:
    """Turn nixfs' own -o values (strings as given) into their types; UsageError for any
    that is not one of them."""
    cfg.ttl = _number(cfg.ttl, float, lambda n: True, "ttl must be a number of seconds")
    cfg.lower_timeout = _number(cfg.lower_timeout, float,
                                lambda n: n >= 0 and n != float("inf"),
                                "lower_timeout must be a number of seconds (0: wait forever)")
    _choice(cfg.listings, "listings", ("best", "kernel", "fixed", "none"), "kernel, fixed or none")
    _choice(cfg.opens, "opens", ("best", "kernel", "nixfs"), "kernel or nixfs")
    cfg.max_nodes = _number(cfg.max_nodes, int, lambda n: n >= 100,
                            "max_nodes must be a whole number of at least 100")
    _choice(cfg.xattr, "xattr", ("auto", "on", "off"), "on or off")
    _choice(cfg.generation, "generation", ("auto", "off"), "auto or off")
    _choice(cfg.refresh_attrs, "refresh_attrs", ("on", "off"), "on or off")
    cfg.poll_us = _number(cfg.poll_us, int, lambda n: -1 <= n <= 10_000,
                          "poll_us must be a whole number of microseconds from 0 to 10000")
