"""The training order: which sample comes where in each epoch, from (seed, epoch) alone.

Both placements read it from here (the FFCV stream's traversal order and the device-resident
loader), so the same seed gives the same batches whichever one runs, and a run resumed at epoch
k sees the order epoch k had. numpy only: no torch, no FFCV.
"""

from __future__ import annotations

import numpy as np


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """int64 order of the positions 0..n-1 for `epoch` of a training loader seeded `seed`.

    Derivation: 64-bit keys from numpy's PCG64 bit generator seeded by SeedSequence([seed,
    epoch]), one per position, and the positions sorted by key (stable sort: a tie, already
    unlikely, still breaks the same way everywhere).
    - SeedSequence of the pair, not seed + epoch: (seed 1, epoch 0) and (seed 0, epoch 1) would
      otherwise share an order, so neighbouring seeds would replay each other's epochs.
    - Raw bit-generator output, not Generator.permutation: numpy keeps the streams of its bit
      generators fixed across releases but not the algorithms of Generator's methods, and the
      order must not change under a numpy upgrade (tests/test_resident.py pins the first values).
    """
    if n < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"n, seed and epoch must be >= 0, got n={n}, seed={seed}, epoch={epoch}")
    keys = np.random.PCG64(np.random.SeedSequence([seed, epoch])).random_raw(n)
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)
