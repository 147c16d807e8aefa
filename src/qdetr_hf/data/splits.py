"""Split names: the canonical spelling of a split and the spellings looked for on disk or in a ``DatasetDict``."""

from __future__ import annotations

__all__ = ["canonical_split"]

# Canonical split name -> accepted spellings, in the order they are looked for on disk / in a DatasetDict.
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid", "dev"),
    "test": ("test", "testing"),
    "trainval": ("trainval",),
}


def canonical_split(split: str) -> str:
    """Map a split name to its canonical spelling (``"val"``/``"valid"``/``"dev"`` -> ``"validation"`` ...).

    Unknown names are returned unchanged (lower-cased), so custom split files still work.

    Args:
        split: A split name.

    Returns:
        The canonical name.
    """
    key = split.strip().lower()
    for canonical, aliases in _SPLIT_ALIASES.items():
        if key in aliases:
            return canonical
    return key


def _split_candidates(split: str) -> tuple[str, ...]:
    """Spellings to look for on disk for ``split``: the name as given first, then its aliases."""
    canonical = canonical_split(split)
    aliases = _SPLIT_ALIASES.get(canonical, (canonical,))
    return tuple(dict.fromkeys((split, split.lower(), *aliases)))
