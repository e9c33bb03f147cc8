"""TEMPORARY shim while the images work moves to unionfs.ociexport / unionfs.ociimport."""

from unionfs.ociexport import Exported, export_layer
from unionfs.ociimport import Format, Imported, LayerError, import_layer

__all__ = ["Exported", "Format", "Imported", "LayerError", "export_layer", "import_layer"]
