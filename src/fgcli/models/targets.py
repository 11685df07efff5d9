"""Which class each map explains: --target resolved against the labels."""

from __future__ import annotations

import difflib

from fgcli.errors import UsageError


def resolve_target(spec: str, categories: tuple[str, ...] | None,
                   n_classes: int) -> int | None:
    """``pred`` -> None; an index; or a class name (exact, case-insensitive)."""
    spec = spec.strip()
    if spec.lower() == "pred":
        return None
    if spec.lstrip("-").isdigit():
        index = int(spec)
        if not 0 <= index < n_classes:
            raise UsageError(f"--target: class {index} is out of range (0..{n_classes - 1})")
        return index
    if not categories:
        raise UsageError(f"--target: {spec!r} is not a class index and the model has no "
                         "class names (give --labels FILE)")
    lowered = [c.lower() for c in categories]
    if spec.lower() in lowered:
        return lowered.index(spec.lower())
    # one of a description's comma-separated names (timm's "tabby, tabby cat")
    alias = [i for i, c in enumerate(lowered) if spec.lower() in (a.strip() for a in c.split(","))]
    if len(alias) == 1:
        return alias[0]
    if alias:
        raise UsageError(f"--target: {spec!r} names several classes "
                         f"({', '.join(str(i) for i in alias)}); give the index")
    close = difflib.get_close_matches(spec.lower(), lowered, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(categories[lowered.index(c)]) for c in close)}?" \
        if close else ""
    raise UsageError(f"--target: no class named {spec!r}{hint}")
