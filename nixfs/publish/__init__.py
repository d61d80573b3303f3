"""Published generations of a shared Nix store (``nixfs publish``, issue 20).

The store's owner writes immutable generations into ``STORE/var/nixfs/generations``:
a snapshot of the Nix database with the GC root's references in it, the lower
index and the catalog of listings a first mount would otherwise learn from the
lower.  Clients verify and use the newest one (``verify``) instead of copying
and relearning the whole store.
"""
