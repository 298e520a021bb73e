"""What both ``training/`` and ``evaluation/`` use: pixel metrics and FID, rank helpers,
checkpoint files and the experiment loggers. It imports neither of them (DESIGN.md, "Layers")."""
