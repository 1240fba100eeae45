"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder (the tests of
tests/test_cluster.py put it there before starting a Ray cluster, so every Ray worker has it):
records each file access under $FASTRES_AUDIT_ROOT to $FASTRES_AUDIT_LOG as
"pid<TAB>event<TAB>r|w<TAB>path", through Python's audit hooks (PEP 578). SQLite opens its
files in C, so its connect event is recorded as a write."""

import os
import sys

_ROOT = os.environ.get("FASTRES_AUDIT_ROOT")
_LOG = os.environ.get("FASTRES_AUDIT_LOG")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_busy = False


def _hook(event: str, args: tuple) -> None:
    global _busy
    if _busy or event not in ("open", "sqlite3.connect", "os.rename", "os.replace",
                              "os.remove", "os.mkdir", "os.rmdir", "os.truncate"):
        return
    _busy = True
    try:
        path = args[0]
        if isinstance(path, int) or path is None:
            return
        path = os.path.abspath(os.fsdecode(path))
        if not path.startswith(_ROOT):
            return
        write = event != "open" or bool(args[2] & _WRITE)
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()}\t{event}\t{'w' if write else 'r'}\t{path}\n".encode())
        finally:
            os.close(fd)
    except Exception:
        pass
    finally:
        _busy = False


if _ROOT and _LOG:
    sys.addaudithook(_hook)
