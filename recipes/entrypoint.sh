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
# gives), no binary caches unless the image's NIX_CONFIG says otherwise.
export NIX_CONFIG="${NIX_CONFIG:-sandbox = false
build-users-group =}"
# shellcheck disable=SC2086 # NIXFS may be a command with arguments
exec $nixfs run --lower "$lower" --upper "$upper" -- "$@"
