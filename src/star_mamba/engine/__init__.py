"""Training engines, run configuration and their small utilities."""
