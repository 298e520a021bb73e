"""Training glue shared by every tokenizer: the Lightning module, EMA, checkpoints,
loggers, callbacks and the run builder used by ``train.py``."""
