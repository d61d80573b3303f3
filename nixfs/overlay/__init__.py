"""The overlay model: two layers merged into one tree, with no knowledge of FUSE."""

from .model import FIRST_HANDLE, Attr, Caller, DirHandle, Handle, NegativeEntry, Overlay, SetAttr

__all__ = ["FIRST_HANDLE", "Attr", "Caller", "DirHandle", "Handle", "NegativeEntry", "Overlay", "SetAttr"]
