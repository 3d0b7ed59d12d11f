"""Writing a file so that a reader never sees half of it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a fresh temporary file beside `path`, then rename it over `path`: a crash leaves the
    old file or the new one, and a reader in another process (a trainer reading a data file another
    process rewrites, two workers merging a JSON record) never reads a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)        # mkstemp's 0600 would make reports and data files private to their writer
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
