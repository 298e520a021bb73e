"""Performance measurements of tokbench beside its peers (not tests).

``python -m benchmarks [--quick] [--out DIR] [--ref DIR]`` runs every measurement in a
fresh process (``benchmarks.child``), repeats it (median), and writes
``benchmark.md`` + ``benchmark.json`` with the machine, its load and the library
versions. Comparisons are ratios of figures measured in the same run. With ``--ref``
(a folder holding local clones of LlamaGen, FQGAN, LightningDiT and ml-flextok) the
reference implementations are imported from there at run time, in their own
processes; without it their rows are skipped and the report says so. See
docs/performance.md.
"""
