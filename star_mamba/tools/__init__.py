"""Tools built on the library: ablation grids, figures, benchmarks and ARM weight conversion.

The top layer beside the command line: tools import models and the engine, nothing below
imports a tool.
"""
