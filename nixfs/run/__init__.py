"""``nixfs run``: one command with a private ``/nix``, for an ordinary user.

Users on clusters, CI runners and pods cannot mount at ``/nix``, and the host
may have no ``/nix`` at all.  So this process enters a new user and mount
namespace of its own (no setuid helper), builds a new root there out of bind
mounts of the host's top-level entries plus an empty ``/nix``, mounts nixfs on
it and runs the command in that root with the user's own uid, environment and
working directory.  Only this namespace ever sees the mounts: they go away with
its last process, also when something fails.

Who does what, all inside the namespace:

- this process (the *runner*) keeps the host's root, so the daemon's paths and
  ``nixfs umount`` work as for any mount; it forwards signals to the command,
  then unmounts and waits for the daemon, and exits with the command's code;
- the daemon, forked by ``daemon.start.mount``, also keeps the host's root, where the
  lower is still the host's (even if that is the host's ``/nix``); it gets
  SIGTERM (and unmounts) if the runner dies;
- the command, forked; it gets SIGKILL if the runner dies.  It enters the new
  root with ``pivot_root(2)`` in a mount namespace of its own, nested in the
  runner's, so the old root is not just out of sight but gone from its
  namespace.  Not ``chroot(2)``: a pod with every capability dropped (OKD's
  restricted SCC) has no CAP_SYS_CHROOT, and the runtime's default seccomp
  profile (containers-common's, which CRI-O uses too) then refuses chroot,
  while it allows unshare, mount, umount2 and pivot_root to anyone.  chroot
  is only the fallback where pivot_root is refused (another seccomp profile,
  or a root that pivot_root cannot move).

Mounting needs CAP_SYS_ADMIN in the namespace, which only lasts until exec:
so every mount is made in this process or in forks of it (ctypes, not
mount(8)), and the command runs with no capabilities, as the user.

Exit codes: the command's (128 + N if signal N ended it); 127 if it is not
found and 126 if it cannot be run; 125 if nixfs could not start it in the new
root (every way of entering it was refused: the message names each refusal and
what to ask the cluster for); 2 if the machine lacks what nixfs run needs
before it starts (``/dev/fuse``, user namespaces), as for every nixfs command.

Its parts: namespace.py (the user and mount namespace, and the new root in it),
enter.py (the command's way into that root), runner.py (the mount, the command,
signals passed on, the unmount).
"""
