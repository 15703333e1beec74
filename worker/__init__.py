"""Celery worker for SparseShot training jobs."""
