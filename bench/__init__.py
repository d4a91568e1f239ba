"""Benchmarks, each ours beside its baseline: run from the repo root as ``python -m bench.<name> [--quick]``.

``embeddings``, ``hstu``, ``ingest``, ``monitors`` and ``daemon`` are runnable; the daemon
benchmark's parts live in ``throughput``, ``freshness``, ``checkpoint`` and ``restart``.
``common`` holds what they all share. Importing any module runs nothing. Results and the
commands that produced them: ``docs/benchmarks.md``.
"""
