"""The web dashboard served at /ui/ (see server.py)."""

from .server import UiApp

__all__ = ["UiApp"]
