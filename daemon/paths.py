"""Where state lives: /var/lib/wattkeeper for root (systemd StateDirectory), XDG otherwise."""

from __future__ import annotations

import contextlib
import os
import tempfile
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


def node_state_file(kind: str, node: str, suffix: str) -> Path:
    """A node's agent's own file in the state directory (one per node name, so several
    agents on one host never share one)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in node)
    return state_dir() / f"{kind}-{safe}{suffix}"


def replace_file(path: Path, text: str, *, mode: int, dir_mode: int = 0o777) -> None:
    """Write ``text`` to ``path`` so that a reader or a crash sees the old file or the
    new one, never half of one: a temporary file beside it, fsynced, renamed over it
    (and removed when anything fails). Raises ``OSError``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
