"""Hydra finds the project's own conf/ ahead of tunelab's packaged groups (tunelab.config.compose)."""
