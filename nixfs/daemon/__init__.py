"""The mount daemon, in the order a mount lives: preflight checks, start (fork and report
to the parent), assemble (the one place that builds and wires every part), serve (the
trio nursery, signals, teardown), control (what the daemon answers ``nixfs`` commands),
status (each part's ``stats()`` merged), and unmount (the command side of the end)."""
