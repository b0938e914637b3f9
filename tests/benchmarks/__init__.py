"""Checks of the scripts in ``benchmarks/`` and of ``benchmarks/README.md``, kept apart from the
library's tests; they run in the default ``pytest`` run. ``tests._benchmarks.load_benchmark``
imports a script as a module."""
