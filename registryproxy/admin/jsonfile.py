"""Small JSON files beside the cache: what the admin API changed, and the day's chart."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.logger import Logger

log = Logger()


def load_json(path: str) -> Any:
    """The file's data; None if it is missing or unreadable (logged: the
    proxy starts without it rather than not at all)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("ignoring unreadable {path}: {why}", path=path, why=e)
        return None


def save_json(path: str, data: Any) -> None:
    """Atomically, durably, readable by the owner only (it may hold passwords)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".saving.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
