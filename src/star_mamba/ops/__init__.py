"""Kernels behind one call each: ``selective_scan`` (reference, torch, numba, triton, cuda)."""
from .scan import BACKENDS, available_backends, default_backend, resolve_backend, selective_scan

__all__ = ["selective_scan", "available_backends", "default_backend", "resolve_backend",
           "BACKENDS"]
