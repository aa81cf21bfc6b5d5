"""Tools built on the library: ablation grids (``ablate``, on the shared pretrain-then-probe
``runner``), figures (``viz``), benchmarks (``bench``, ``bench_input``; the GPU acceptance run
lives in ``benchmarks/gpu/``, outside the package) and ARM weight conversion (``arm``).

The top layer beside the command line: tools import models and the engine, nothing below
imports a tool.
"""
