"""Command-line drivers over the library: downloads, and later the other tools."""
