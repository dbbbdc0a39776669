"""Golconde's full-scale reliability ("chaos") suite: ``python chaos/run.py --help``."""
