"""The old home of fastres.run.train, kept so that `python -m fastres.train` and
`fastres.train.train` work as documented. It is that module itself (not a copy of its names):
patches and isinstance checks see one module."""

import sys

import fastres.run.train as _home

if __name__ == "__main__":
    sys.exit(_home.main())
sys.modules[__name__] = _home
