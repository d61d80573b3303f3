"""Copy-on-write files over a read-only base: the map (cowmap), the file (cowfile) and the
SQLite VFS over them (vfs), so a fresh upper starts from a published generation without
copying it (issue 20)."""
