"""FFCV data pipelines (installed as fastres.loaders)."""
