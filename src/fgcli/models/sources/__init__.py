"""Model sources: one resolver per form of ``--model``, each registered by name here, all
returning :class:`fgcli.models.base.Built`.

* ``torchvision`` (:mod:`fgcli.models.sources.tvision`) -- torchvision classifier names;
  the source of every ``--model`` no other source claims;
* ``timm`` (:mod:`fgcli.models.sources.timm_source`) -- ``timm/NAME``;
* ``code`` and ``pickle`` (:mod:`fgcli.models.sources.usercode`) -- ``file.py:factory`` /
  ``package.module:factory``, and whole pickled model files;
* :mod:`fgcli.models.sources.checkpoint` -- checkpoint files of every kind, unwrapped and
  fitted to an architecture in one place (no source of its own).

The registry has the shape of torchvision's ``register_model`` / ``get_model``: each
source module registers its loader with :func:`register_source` (a duplicate name is
refused) and says which ``--model`` values it claims; :func:`get_source` picks the one
source that claims a value. No two sources may claim the same value (checked on every
look-up), so the order of registration never matters. The source modules register when
imported: :mod:`fgcli.models.load` imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Source", "get_source", "register_source", "source_names"]


class Loader(Protocol):
    """``(spec, weights, *, model_args, trust_pickle, size) -> Built``."""

    def __call__(self, spec: str, weights: str, *, model_args: dict[str, Any] | None,
                 trust_pickle: bool, size: int | None) -> Any: ...


@dataclass(frozen=True)
class Source:
    """One form of ``--model``: its name (run.json's ``source``), which values it claims
    (None: the fallback, every value no other source claims) and its loader."""

    name: str
    claims: Callable[[str], bool] | None
    load: Loader


_SOURCES: dict[str, Source] = {}


def register_source(name: str, claims: Callable[[str], bool] | None = None
                    ) -> Callable[[Loader], Loader]:
    """Decorator: register ``load`` as the source ``name``. ``claims(spec)`` says whether a
    ``--model`` value is this source's; None makes it the fallback (one at most)."""

    def deco(load: Loader) -> Loader:
        if name in _SOURCES:
            raise ValueError(f"model source {name!r} is already registered")
        if claims is None and any(s.claims is None for s in _SOURCES.values()):
            raise ValueError(f"model source {name!r}: there is a fallback source already")
        _SOURCES[name] = Source(name, claims, load)
        return load

    return deco


def get_source(spec: str) -> Source:
    """The source that resolves the ``--model`` value ``spec``."""
    spec = spec.strip()
    claimed = [s for s in _SOURCES.values() if s.claims is not None and s.claims(spec)]
    if len(claimed) > 1:  # pragma: no cover - a programming error in a source's claims
        raise RuntimeError(f"--model {spec}: claimed by the sources "
                           f"{', '.join(s.name for s in claimed)}")
    if claimed:
        return claimed[0]
    fallback = [s for s in _SOURCES.values() if s.claims is None]
    if not fallback:  # pragma: no cover - fgcli.models.load registers torchvision
        raise RuntimeError("no model source is registered")
    return fallback[0]


def source_names() -> list[str]:
    """The registered sources' names, in registration order."""
    return list(_SOURCES)
