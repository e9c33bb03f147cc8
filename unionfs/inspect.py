"""TEMPORARY shim while the images work moves to unionfs.layers / unionfs.merged."""

from unionfs.layers import Stack, open_stack
from unionfs.merged import (
    MergedDir,
    WalkEntry,
    data_ref,
    join,
    open_data,
    read_xattrs,
    root_dir,
    user_visible_xattr,
    walk,
)
from unionfs.report import inspect

__all__ = ["MergedDir", "Stack", "WalkEntry", "data_ref", "inspect", "join", "open_data",
           "open_stack", "read_xattrs", "root_dir", "user_visible_xattr", "walk"]
