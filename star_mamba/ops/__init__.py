"""Kernels behind one call each: ``selective_scan`` (reference, torch, cuda)."""
from .selective_scan import BACKENDS, available_backends, selective_scan

__all__ = ["selective_scan", "available_backends", "BACKENDS"]
