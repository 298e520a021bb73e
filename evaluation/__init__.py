"""The evaluator: one yardstick for every tokenizer (SPEC.md §8).

`metrics` (per-image and split-level metrics), `distributed` (rank helpers),
`runner` (one pass over the validation split for one tokenizer), `report` (JSON,
CSV, Markdown), `plots` (PNG figures), `generation` (generator sampling, gFID and IS
per generator), `main` (what `evaluate.py` calls).
"""
