"""Which features of nixfs' pyfuse3 patch series the installed pyfuse3 has.

nixfs works with a stock pyfuse3 and is faster with one built from the series in
scripts/pyfuse3/ (scripts/build-pyfuse3): each patch there adds one feature and a module
attribute ``NAME = True`` that tells it is present.  This module asks pyfuse3 once, at
import, and every use of a patch feature in nixfs goes through ``FEATURES`` here, so a
pyfuse3 without the series, or with only part of it, turns each missing feature's use off
in one place.  Modules read ``features.FEATURES.name`` when they use it (not a copy
taken at their import), so a test can swap in a ``Features.of(fake_module)``.
"""

from __future__ import annotations

import dataclasses

import pyfuse3


@dataclasses.dataclass(frozen=True)
class Features:
    """One flag per patch of scripts/pyfuse3/, named after the attribute it adds (lowercase)."""

    cache_readdir: bool = False  # 01: opendir may return FileInfo(keep_cache=True)
    readdir_by_inode: bool = False  # 02: readdir by inode, opendir answering ENOSYS
    cache_symlinks: bool = False  # 03: enable_cache_symlinks
    poll_before_sleep: bool = False  # 04: main(poll_us=...)
    keep_attributes: bool = False  # 05: keep_attributes()/drop_attributes()
    files_by_inode: bool = False  # 06: open answering ENOSYS, reads by inode
    readdir_end: bool = False  # 07: readdir returning True (needs 02)
    refresh_attributes: bool = False  # 08: refresh_attributes(paths)
    readdir_without_node: bool = False  # 09: readdir_reply_without_node()

    @classmethod
    def of(cls, module) -> Features:
        """The features *module* (pyfuse3, or a stand-in) says it has."""
        return cls(**{f.name: bool(getattr(module, f.name.upper(), False))
                      for f in dataclasses.fields(cls)})

    def absent(self) -> list[str]:
        """The module attributes of the features this pyfuse3 lacks."""
        return [f.name.upper() for f in dataclasses.fields(self) if not getattr(self, f.name)]


FEATURES = Features.of(pyfuse3)
