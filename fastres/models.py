"""The old home of fastres.study.models, kept so that `fastres.models.from_seed_checkpoint` and
`fastres.models.build` work as documented. It is that module itself (not a copy of its names):
patches and isinstance checks see one module."""

import sys

import fastres.study.models as _home

sys.modules[__name__] = _home
