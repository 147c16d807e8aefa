"""Hub ids versus local paths: one rule for telling them apart, and the error for a local path that is not there."""

from __future__ import annotations

import os
from pathlib import Path

LOCAL_SUFFIXES = {".json", ".xml", ".txt", ".arrow", ".parquet", ".onnx", ".safetensors"}


def looks_like_local_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` cannot be a Hub ``owner/name`` id and so is meant as a local path (absolute, relative with
    ``.``/``~``, Windows-style, more than one ``/``, or a file suffix)."""
    text = str(name)
    return (
        isinstance(name, Path)
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or Path(text).suffix.lower() in LOCAL_SUFFIXES
    )


def check_local_path(name: str | os.PathLike, what: str) -> None:
    """Raise a clear ``FileNotFoundError`` when ``name`` is meant as a local path that does not exist (instead of the
    Hub client's "Repo id must be in the form ..." for a mistyped folder).

    Args:
        name: A Hub id or a local path.
        what: What the path should hold, for the message (e.g. ``"Model folder"``).
    """
    if looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{what} not found: {name} (no such local path; a Hub id has the form 'owner/name').")


def public_name(name: str | os.PathLike | None) -> str | None:
    """How a model or dataset is named where others read it (model cards, results files): a Hub id as it is, a local
    path by its last component only, so a pushed card does not publish the user's directory layout."""
    if name is None:
        return None
    text = str(name)
    if looks_like_local_path(text) or Path(text).expanduser().exists():
        return Path(text).expanduser().resolve().name or text
    return text


__all__ = ["check_local_path", "looks_like_local_path", "public_name"]
