"""The folder the engine processes leave their counters in for the API server: this user's alone.

The default lives under the shared temporary directory. Another local user could create it first or
plant counter files in it, and the API server would export them as its own; so the folder is created
with mode 0700, refused when someone else owns it or can write to it, and only this user's files in it
are read (:func:`collectors.vllm.stats.read_snapshots`).

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp()) / "counters"
>>> make_private_folder(folder); private_folder(folder)
True
>>> folder.chmod(0o777); private_folder(folder)
False
"""

from __future__ import annotations

import os
from pathlib import Path


def private_folder(folder: Path) -> bool:
    """``folder`` is ours alone: owned by this user and writable by nobody else (the default lives
    under the shared temporary directory, where another user could plant counter files)."""
    try:
        st = folder.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def make_private_folder(folder: Path) -> None:
    """Create ``folder`` for this user only (mode 0700); an existing one must already be private."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not private_folder(folder):
        raise OSError(f"{folder} is owned by another user or writable by others; set LATENTWATCH_VLLM_STATS_DIR "
                      "to a private folder")
