"""Reference ops (the oracle) and the torch reference attention backend."""
