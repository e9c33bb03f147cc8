"""TEMPORARY shim while the images work moves to unionfs.layers / unionfs.merged."""

from unionfs.layers import Stack, open_stack
from unionfs.merged import MergedDir, WalkEntry, join, open_data, read_xattrs, root_dir, walk

__all__ = ["MergedDir", "Stack", "WalkEntry", "join", "open_data", "open_stack", "read_xattrs",
           "root_dir", "walk"]
