"""The old home of fastres.study.structures, kept so that `python -m fastres.structures` works
as documented. It is that module itself (not a copy of its names)."""

import sys

import fastres.study.structures as _home

if __name__ == "__main__":
    sys.exit(_home.main())
sys.modules[__name__] = _home
