"""Sparrow's benchmarks: speed against the references, never correctness tests (those live in tests/).

Each ``bench_<name>.py`` is a script taking ``--quick`` and ``--out PATH.json``; it checks its results
against the reference before timing, prints one table and writes JSON of the form
``{"meta": {device, commit, date, versions...}, "rows": [...], "plot": {"x": ..., "y": [...], "series": ...}}``.
``python -m benchmarks`` runs them all and draws the plots.
"""
