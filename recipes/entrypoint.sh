#!/bin/sh
# Entrypoint of the nixfs image: run the container's command with nixfs mounted at /nix.
# No privileges: nixfs run makes a user and mount namespace and mounts there (it needs
# /dev/fuse in the container and user namespaces allowed; see docs/setups.md).
#
#   NIXFS_LOWER  the host's Nix directory (holding store/ and var/nix/db), read-only;
#                default /nix-lower
#   NIXFS_UPPER  a writable directory for what is built here (an emptyDir or a volume);
#                default /nix-upper
#   NIXFS        how to call nixfs (default: nixfs)
#   NIXFS_SUBSTITUTERS         binary caches Nix may fetch from, space-separated (default:
#                none: a pod is often offline, and there Nix would spend seconds per
#                nix-build retrying cache.nixos.org); e.g. https://cache.nixos.org
#   NIXFS_TRUSTED_PUBLIC_KEYS  the keys those caches sign with (default: Nix's own,
#                cache.nixos.org-1's)
#   NIX_CONFIG   your own Nix settings: they come after these, so they win
# With no arguments it starts a shell.
set -eu
lower=${NIXFS_LOWER:-/nix-lower}
upper=${NIXFS_UPPER:-/nix-upper}
nixfs=${NIXFS:-nixfs}

if [ ! -d "$lower/store" ]; then
    echo "entrypoint: $lower holds no store/: mount the host's /nix there (read-only)" >&2
    exit 2
fi
mkdir -p "$upper"
if [ ! -w "$upper" ]; then
    echo "entrypoint: the upper $upper is not writable by uid $(id -u)" >&2
    exit 2
fi
[ "$#" -gt 0 ] || set -- /bin/sh
# A single-user Nix inside: no build users, no sandbox (it needs more namespaces than a pod
# gives), and only the binary caches named above.
config="sandbox = false
build-users-group =
substituters = ${NIXFS_SUBSTITUTERS:-}"
if [ -n "${NIXFS_TRUSTED_PUBLIC_KEYS:-}" ]; then
    config="$config
trusted-public-keys = $NIXFS_TRUSTED_PUBLIC_KEYS"
fi
if [ -n "${NIX_CONFIG:-}" ]; then
    config="$config
$NIX_CONFIG"
fi
export NIX_CONFIG="$config"
# shellcheck disable=SC2086 # NIXFS may be a command with arguments
exec $nixfs run --lower "$lower" --upper "$upper" -- "$@"
