"""Where state lives: /var/lib/wattkeeper for root (systemd StateDirectory), XDG otherwise."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """The directory for the default SQLite store; $WATTKEEPER_STATE_DIR wins when set."""
    override = os.environ.get("WATTKEEPER_STATE_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/lib/wattkeeper")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "wattkeeper"


def default_db_url() -> str:
    return f"sqlite:///{state_dir() / 'wattkeeper.db'}"
