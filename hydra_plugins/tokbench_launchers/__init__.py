"""Hydra launcher plugins of this project (see launchers.py)."""
