"""Publishing folders atomically: write a folder under a temporary name, then rename it into place."""

from __future__ import annotations

import os
import shutil
import tempfile


def replace_folder(staging: str, out: str) -> None:
    """Rename the complete folder ``staging`` to ``out``. An existing ``out`` is moved aside first and deleted only
    once the new one is in place, so at every moment ``out`` is either the old folder or the new one."""
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.replaced-", dir=os.path.dirname(out) or ".")
    previous = os.path.join(trash, "previous")
    os.rename(out, previous)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(previous, out)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
