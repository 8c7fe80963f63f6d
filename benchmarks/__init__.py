"""dpjax benchmarks: scripts, and the modules their tests import.

A regular package, not a namespace one: on the GPU machine the opacus wheel installs a
top-level ``benchmarks`` package too, and a regular package anywhere on ``sys.path``
wins over a namespace package, whatever the order (benchmarks/gpu/PLAN.md).
"""
