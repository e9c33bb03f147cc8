"""Unit tests: the modules of unionfs/ called in-process on temp dirs, no mount."""
