"""The overlay model: two layers merged into one tree, with no knowledge of FUSE."""

from .model import Overlay
from .types import FIRST_HANDLE, Attr, Caller, DirHandle, Handle, NegativeEntry, SetAttr

__all__ = ["FIRST_HANDLE", "Attr", "Caller", "DirHandle", "Handle", "NegativeEntry", "Overlay",
           "SetAttr"]
