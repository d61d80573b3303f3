"""The overlay model: two layers merged into one tree, with no knowledge of FUSE."""

from .model import Overlay
from .types import FIRST_HANDLE, Attr, Caller, DirHandle, Dirent, Handle, NegativeEntry, SetAttr

__all__ = ["FIRST_HANDLE", "Attr", "Caller", "DirHandle", "Dirent", "Handle", "NegativeEntry", "Overlay",
           "SetAttr"]
