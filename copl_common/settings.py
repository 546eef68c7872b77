"""Where things live, from the environment, in one place.

| variable        | default                                   | what                              |
| --------------- | ----------------------------------------- | --------------------------------- |
| COPL_HOME       | $XDG_DATA_HOME/copl or ~/.local/share/copl | the data directory                |
| COPL_DB_URL     | sqlite:///$COPL_HOME/copl.db              | the preference store (any SQLAlchemy URL) |
| COPL_REGISTRY   | $COPL_HOME/registry                       | the release registry directory    |
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def data_dir() -> Path:
    if home := os.environ.get("COPL_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(xdg) / "copl"


def default_db_url() -> str:
    return os.environ.get("COPL_DB_URL") or f"sqlite:///{data_dir() / 'copl.db'}"


def default_registry() -> Path:
    return Path(os.environ.get("COPL_REGISTRY") or data_dir() / "registry").expanduser()


@dataclass(frozen=True)
class Limits:
    """Documented input limits, enforced by ingestion and the services alike."""

    max_user_id_chars: int = 128
    max_group_chars: int = 64
    max_prompt_chars: int = 16_000
    max_response_chars: int = 16_000


LIMITS = Limits()
