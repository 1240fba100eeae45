"""Triton kernels (installed as fastres.kernels)."""
