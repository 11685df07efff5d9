"""What a dump says to its caller: the :class:`RunReport` (counts, exit code) and the
:class:`Reporter` protocol through which it reports progress (the CLI's console, a
torchrun rank's heartbeat, or :class:`SilentReporter`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from fgcli.signals import EXIT_CODES


@dataclass
class ObjectsTally:
    """--boxes / --masks: how many of this run's images matched an annotation, and how
    many annotations matched none of them (``names``: the annotation's size)."""

    source: str
    names: int
    annotated: int = 0
    unannotated: int = 0
    matched: set[str] = field(default_factory=set)  # bounded by the annotation's size
    by_class: bool | None = None  # the labels name the model's classes (once loaded)

    def count(self, record: dict[str, Any]) -> None:
        """One image's ok or skipped record (its first rank): the images with a result."""
        objects = record.get("objects")
        if objects is None:
            self.unannotated += 1
            return
        self.annotated += 1
        if objects.get("name") is not None:
            self.matched.add(objects["name"])

    def as_json(self) -> dict[str, Any]:
        """The counts as JSON (a torchrun rank posts them for rank 0's summary)."""
        return {"source": self.source, "names": self.names, "annotated": self.annotated,
                "unannotated": self.unannotated, "matched": sorted(self.matched),
                "by_class": self.by_class}

    @classmethod
    def added(cls, posted: list[dict[str, Any]]) -> ObjectsTally:
        """Several ranks' :meth:`as_json` counts as one run's."""
        total = cls(posted[0]["source"], posted[0]["names"], by_class=posted[0]["by_class"])
        for p in posted:
            total.annotated += p["annotated"]
            total.unannotated += p["unannotated"]
            total.matched.update(p["matched"])
        return total

    def line(self) -> str:
        """The one summary line (:func:`fgcli.audit.annotations.summary_line`)."""
        from fgcli.audit.annotations import summary_line

        return summary_line(self.source, self.annotated, self.annotated + self.unannotated,
                            max(self.names - len(self.matched), 0), by_class=self.by_class)


@dataclass
class RunReport:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    out: str = ""
    stopped_early: bool = False
    first_error: str | None = None
    device: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    interrupted: str | None = None  # "SIGINT" / "SIGTERM": stopped by that signal
    objects: ObjectsTally | None = None  # --boxes / --masks

    @property
    def images(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def exit_code(self) -> int:
        """0: every image ok or skipped as done; 1: some images failed; 130 / 143:
        stopped by SIGINT / SIGTERM."""
        if self.interrupted:
            return EXIT_CODES.get(self.interrupted, 130)
        return 1 if self.failed else 0


class Reporter(Protocol):
    """How a run talks to its caller. ``alert`` is for problems that must reach the user
    even with ``--quiet`` (an input without images); failed images come through
    ``record`` with status ``failed``; ``progress`` is called after every batch the
    engine finishes (torchrun's heartbeat counts it as a sign of life)."""

    def started(self, info: dict[str, Any]) -> None: ...

    def warn(self, message: str) -> None: ...

    def alert(self, message: str) -> None: ...

    def progress(self) -> None: ...

    def record(self, record: dict[str, Any], line: str, image_done: bool) -> None: ...

    def finished(self, report: RunReport) -> None: ...


class SilentReporter:
    def started(self, info: dict[str, Any]) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def alert(self, message: str) -> None:
        pass

    def progress(self) -> None:
        pass

    def record(self, record: dict[str, Any], line: str, image_done: bool) -> None:
        pass

    def finished(self, report: RunReport) -> None:
        pass

