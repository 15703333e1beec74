"""SparseShot HTTP service."""
