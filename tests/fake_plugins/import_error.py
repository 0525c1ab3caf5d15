"""A plugin whose import fails."""

raise ImportError("libfakeaccel.so: cannot open shared object file")
