"""recipes/systemd: the units for a node's /nix load cleanly and order a boot without cycles.

``systemd-analyze verify`` loads the units with their drop-ins and builds the start
transaction of the unit named, so unknown keys, bad values and ordering cycles show.  It
needs no running systemd.  Debian's nix-daemon units are used where nix-setup-systemd is
installed; elsewhere units with the settings of theirs that matter here stand in.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
from harness import REPO

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze (package systemd)")

RECIPES = REPO / "recipes/systemd"
DEBIAN_UNITS = Path("/lib/systemd/system")
# What of Debian's nix-setup-systemd units the recipes rely on or work around.
STAND_INS = {
    "nix-daemon.socket": """[Unit]
Description=stand-in for Debian's nix-daemon.socket
Before=multi-user.target
RequiresMountsFor=/nix/store
ConditionPathIsReadWrite=/nix/var/nix/daemon-socket
[Socket]
ListenStream=/nix/var/nix/daemon-socket/socket
[Install]
WantedBy=sockets.target
""",
    "nix-daemon.service": """[Unit]
Description=stand-in for Debian's nix-daemon.service
RequiresMountsFor=/nix/store /nix/var /nix/var/nix/db
ConditionPathIsReadWrite=/nix/var/nix/daemon-socket
[Service]
ExecStart=/usr/bin/nix-daemon --daemon
KillMode=process
[Install]
WantedBy=multi-user.target
""",
}
UNITS = ("nix.mount", "nixfs-nix-dirs.service", "nix-daemon.socket", "nix-daemon.service")


def unit_dir(tmp_path: Path) -> Path:
    """The recipes' units and drop-ins beside nix-daemon's, as /etc/systemd/system has them."""
    d = tmp_path / "units"
    shutil.copytree(RECIPES, d)
    (d / "nixfs-nix.conf").unlink()  # the tmpfiles.d rule
    for name, text in STAND_INS.items():
        if (DEBIAN_UNITS / name).exists():
            shutil.copy(DEBIAN_UNITS / name, d / name)
        else:
            (d / name).write_text(text)
    return d


def verify(units: Path, *names: str) -> str:
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *names],
                          capture_output=True, text=True, cwd=units,
                          env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin"})
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0
                                                  else f"\n(exit {proc.returncode})")


def boot(units: Path) -> str:
    """Verify what a boot starts: basic.target, the sockets, the daemon, nix.mount."""
    (units / "boot-test.target").write_text(
        "[Unit]\nWants=basic.target sockets.target nix-daemon.socket nix-daemon.service "
        "nix.mount\n")
    return verify(units, "boot-test.target")


def with_nfs_lower(units: Path) -> None:
    """The lower on NFS (nix.mount with _netdev, after the network), and a wait-online
    service with default dependencies (as NetworkManager's is)."""
    mount = (units / "nix.mount").read_text()
    mount = mount.replace("RequiresMountsFor=/shared/nix /var/lib/nixfs/upper",
                          "RequiresMountsFor=/shared/nix")
    mount = mount.replace(",allow_other\n", ",allow_other,_netdev\n")
    assert "_netdev" in mount
    (units / "nix.mount").write_text(mount)
    (units / "shared-nix.mount").write_text(
        "[Mount]\nWhat=storehost:/nix\nWhere=/shared/nix\nType=nfs\nOptions=ro\n")
    (units / "wait-online-test.service").write_text(
        "[Unit]\nBefore=network-online.target\n[Service]\nType=oneshot\nExecStart=/bin/true\n")
    (units / "network-online.target.d").mkdir()
    (units / "network-online.target.d/test.conf").write_text(
        "[Unit]\nWants=wait-online-test.service\n")


def test_units_and_drop_ins_verify_cleanly(tmp_path):
    units = unit_dir(tmp_path)
    assert verify(units, *UNITS) == ""
    assert boot(units) == ""


def test_a_boot_with_the_lower_on_nfs_has_no_ordering_cycle(tmp_path):
    units = unit_dir(tmp_path)
    with_nfs_lower(units)
    assert boot(units) == ""
    # Without the socket drop-in's own defaults, its default ordering before
    # sockets.target (so before basic.target and the network) closes a cycle.
    dropin = units / "nix-daemon.socket.d/nixfs.conf"
    dropin.write_text(dropin.read_text().split("DefaultDependencies=no")[0])
    assert "ordering cycle" in boot(units)


def test_the_fstab_line_matches_the_mount_unit():
    """The fstab line in nix.mount's comment mounts the same thing as the unit."""
    text = (RECIPES / "nix.mount").read_text()
    line = next(x for x in text.splitlines() if x.startswith("#   nixfs  /nix  fuse.nixfs"))
    source, where, fstype, options = line[1:].split()[:4]
    unit = dict(x.split("=", 1) for x in text.splitlines() if "=" in x and not x.startswith("#"))
    assert (source, where, fstype) == (unit["What"], unit["Where"], unit["Type"])
    fstab_options = [o for o in options.split(",") if not o.startswith("x-systemd.")]
    assert fstab_options == unit["Options"].split(",")
    required = {o.split("=", 1)[1] for o in options.split(",")
                if o.startswith("x-systemd.requires-mounts-for=")}
    assert required == set(unit["RequiresMountsFor"].split())
