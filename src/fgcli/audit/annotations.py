"""Object annotations for the pointing game: ``--boxes SOURCE`` and ``--masks DIR``.

:func:`read_annotations` reads what people have (a folder of Pascal VOC / ImageNet XML, a
COCO instances JSON, a CSV ``path,x0,y0,x1,y1[,label]``, or a folder of mask PNGs) into one
:class:`Annotations`, which finds an image's objects by its item key. Boxes are kept in
continuous original-image pixel coordinates (x right, y down, pixel i covers [i, i+1)),
whatever the model's preprocessing does. A file that cannot be read is a one-line
:class:`~fgcli.errors.UsageError` naming the file (and line) before any image is processed;
images and annotations that do not match are only counted (:meth:`Annotations.summary`).
User documentation: docs/audit.md, "Annotations: --boxes and --masks".
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from xml.etree import ElementTree

import numpy as np

from fgcli.errors import UsageError

CSV_SUFFIXES = (".csv", ".txt")
_CSV_FIELDS = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True, slots=True)
class Obj:
    """One box in continuous original-pixel coordinates (x0 < x1, y0 < y1)."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None


@dataclass
class ImageObjects:
    """One image's annotation: its boxes (in the source's order), or its mask PNG."""

    name: str  # the annotation's own name for the image (path as written)
    boxes: list[Obj]  # [] for masks
    mask: Path | None = None

    def mask_array(self) -> np.ndarray:
        """The mask as (H, W) bool, nonzero = object (any colour channel; alpha ignored).
        Read only when asked, so an unreadable PNG fails only the images that use it:
        ValueError, one line naming the file."""
        from PIL import Image

        if self.mask is None:
            raise ValueError(f"{self.name}: no mask (a --boxes annotation)")
        try:
            with Image.open(self.mask) as image:
                image.load()
                if image.mode in ("LA", "RGBA", "PA"):
                    image = image.convert("L" if image.mode == "LA" else "RGB")
                array = np.asarray(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ValueError(f"--masks {self.mask}: cannot read the PNG ({reason})") from None
        return array.any(axis=2) if array.ndim == 3 else array != 0


def _norm_label(text: str) -> str:
    """A label or class name as compared: case-folded, ``_`` as a space, spaces collapsed."""
    return " ".join(text.replace("_", " ").casefold().split())


def _norm_name(name: str) -> str:
    """An annotation's or key's path as compared: ``/`` separators, no leading ``./``."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def _no_ext(name: str) -> str:
    path = PurePosixPath(name)
    return str(path.with_suffix("")) if path.suffix else name


def _stem(name: str) -> str:
    return PurePosixPath(name).stem


class Annotations:
    """Every image's objects from one source, found by item key.

    Matching: a key and an annotation name match when their paths without extension are
    equal (an exact name wins when several share that path); failing that, when their file
    stems are equal and no other annotation name has that stem.
    """

    def __init__(self, source: str, path: Path, images: dict[str, ImageObjects]) -> None:
        self.source = source
        self.path = path
        self._images = images
        self._by_path: dict[str, list[str]] = {}
        self._by_stem: dict[str, list[str]] = {}
        for name in images:
            norm = _norm_name(name)
            self._by_path.setdefault(_no_ext(norm), []).append(name)
            self._by_stem.setdefault(_stem(norm), []).append(name)
        self._labels = sorted({o.label for i in images.values() for o in i.boxes
                               if o.label is not None})
        self._unlabelled = any(o.label is None for i in images.values() for o in i.boxes)

    def __len__(self) -> int:
        return len(self._images)

    def identity(self) -> str:
        """A hash of what the annotation says (names, boxes, labels; masks: each file's
        size and modification time), for the resume fingerprint: an edited file counts,
        the spelling of its path does not."""
        digest = hashlib.sha256(self.source.encode())
        for norm in sorted(self._images):
            image = self._images[norm]
            digest.update(f"\0{norm}".encode())
            for o in image.boxes:
                digest.update(f"|{o.x0!r},{o.y0!r},{o.x1!r},{o.y1!r},{o.label!r}".encode())
            if image.mask is not None:
                try:
                    st = image.mask.stat()
                    digest.update(f"|{st.st_size},{st.st_mtime_ns}".encode())
                except OSError:
                    digest.update(b"|missing")
        return digest.hexdigest()[:16]

    def _match(self, key: str) -> tuple[str | None, bool]:
        """The annotation name matching ``key`` (or None), and whether the key was
        ambiguous (its stem shared by several annotations, none matching by path)."""
        norm = _norm_name(key)
        same = self._by_path.get(_no_ext(norm), [])
        if len(same) == 1:
            return same[0], False
        exact = [n for n in same if _norm_name(n) == norm]
        if exact:
            return exact[0], False
        if same:
            return None, True
        stems = self._by_stem.get(_stem(norm), [])
        return (stems[0], False) if len(stems) == 1 else (None, len(stems) > 1)

    def find(self, key: str) -> ImageObjects | None:
        """The objects of the image with item key ``key`` (relative posix path), or None."""
        name, _ = self._match(key)
        return None if name is None else self._images[name]

    def names_classes(self, categories: Sequence[str] | None, n_classes: int) -> bool:
        """Whether the labels name the model's classes: every distinct label equals a
        category name (case-insensitive, ``_`` and space alike) or is a decimal class index
        in [0, n_classes). False without labels (masks, unlabelled CSV): every box is used."""
        if not self._labels or self._unlabelled:  # a box without a label names no class
            return False
        names = {_norm_label(c) for c in categories or ()}
        return all(_names_class(label, names, n_classes) for label in self._labels)

    def summary(self, keys: Iterable[str], by_class: bool | None = None) -> str:
        """One line: how many of ``keys`` matched an annotation, how many did not, and how
        many annotations matched no key."""
        total = matched = ambiguous = 0
        used: set[str] = set()
        for key in keys:
            total += 1
            name, unclear = self._match(key)
            if name is not None:
                matched += 1
                used.add(name)
            ambiguous += unclear
        return summary_line(self.source, matched, total, len(self._images) - len(used),
                            ambiguous, by_class)


def summary_line(source: str, matched: int, images: int, unused: int, ambiguous: int = 0,
                 by_class: bool | None = None) -> str:
    """The one summary line of an annotated run (dump and eval say the same): how many
    images matched an annotation, how many annotations matched no image, and (when known)
    whether the labels name the model's classes."""
    line = (f"{source}: {matched} of {images} image{'s' if images != 1 else ''} "
            f"annotated; {images - matched} without an annotation")
    if ambiguous:
        line += f" ({ambiguous} with a stem shared by several annotations)"
    line += (f"; {unused} annotation{'s' if unused != 1 else ''} "
             f"match{'es' if unused == 1 else ''} no image")
    if by_class is not None and source == "boxes":
        line += ("; labels name the model's classes: the target's boxes count" if by_class
                 else "; labels are not all class names: every box counts")
    return line


def _names_class(label: str, names: set[str], n_classes: int) -> bool:
    text = label.strip()
    if text.isdecimal():
        return int(text) < n_classes
    return _norm_label(text) in names


def label_is(label: str | None, target: int, target_name: str) -> bool:
    """Whether a box's label names the class ``target`` (index or name, as
    :meth:`Annotations.names_classes` compares them)."""
    if label is None:
        return False
    text = label.strip()
    if text.isdecimal():
        return int(text) == target
    return _norm_label(text) == _norm_label(target_name)


def boxes_for(objects: ImageObjects, target: int, target_name: str,
              by_class: bool) -> tuple[list[Obj], str]:
    """The boxes a pointing game for ``target`` uses, and the ``match`` it records:
    ``by_class`` (the labels name classes): the boxes of the target's class, "class", or
    none, "absent"; otherwise every box, "any". An image annotated with no box at all
    is "absent" too: there is nothing to point at. Masks: no boxes, "any"."""
    if objects.mask is not None:
        return [], "any"
    if not by_class:
        return list(objects.boxes), "any" if objects.boxes else "absent"
    used = [o for o in objects.boxes if label_is(o.label, target, target_name)]
    return used, "class" if used else "absent"


def read_annotations(boxes: str | None = None, masks: str | None = None) -> Annotations:
    """Read ``--boxes PATH`` or ``--masks DIR`` (exactly one). ``--boxes``: a folder means
    Pascal VOC / ImageNet XML files under it (recursive), a ``.json`` file a COCO instances
    file, a ``.csv`` or ``.txt`` file a CSV; anything else is a UsageError. Errors are one
    line naming the file (and line where known)."""
    if (boxes is None) == (masks is None):
        raise UsageError("give one of --boxes or --masks, not both" if boxes is not None
                         else "give --boxes or --masks")
    if masks is not None:
        return Annotations("masks", Path(masks), _read_masks(Path(masks)))
    path = Path(boxes or "")
    if not boxes or not path.exists():
        raise UsageError(f"--boxes {boxes}: no such file or directory")
    if path.is_dir():
        images = _read_xml_folder(path)
    elif path.suffix.lower() == ".json":
        images = _read_coco(path)
    elif path.suffix.lower() in CSV_SUFFIXES:
        images = _read_csv(path)
    else:
        raise UsageError(f"--boxes {path}: unknown format; give a folder of Pascal VOC XML "
                         f"files, a COCO .json file or a .csv/.txt file")
    return Annotations("boxes", path, images)


def _box(where: str, x0: float, y0: float, x1: float, y1: float, label: str | None) -> Obj:
    """An Obj after checking its coordinates; UsageError ``where: reason`` otherwise."""
    for name, value in zip(_CSV_FIELDS, (x0, y0, x1, y1)):
        if not math.isfinite(value):
            raise UsageError(f"{where}: {name} is not finite ({value})")
    if x0 >= x1 or y0 >= y1:
        axis, lo, hi = ("x", x0, x1) if x0 >= x1 else ("y", y0, y1)
        raise UsageError(f"{where}: empty box: {axis}0 ({lo:g}) must be less than "
                         f"{axis}1 ({hi:g})")
    return Obj(x0, y0, x1, y1, label)


def _add(images: dict[str, ImageObjects], name: str, boxes: list[Obj]) -> None:
    """Append ``boxes`` to the image ``name`` (several rows or files for one image add up;
    ``./a.jpg``, ``a.jpg`` and ``sub\\a.jpg`` / ``sub/a.jpg`` are one image, shown by its
    first spelling)."""
    norm = _norm_name(name)
    if norm in images:
        images[norm].boxes.extend(boxes)
    else:
        images[norm] = ImageObjects(name, boxes)


def _walk(root: Path, suffix: str) -> Iterator[Path]:
    """The files under ``root`` ending in ``suffix`` (any case), sorted, recursively."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(suffix):
                yield Path(folder) / name


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read ({exc.strerror or exc})") from None


def _number(where: str, field: str, text: Any) -> float:
    """``text`` as a float; UsageError ``where: field is not a number`` otherwise."""
    try:
        if isinstance(text, bool):
            raise TypeError(text)
        return float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: {field} is not a number: {text!r}") from None


def _read_xml_folder(root: Path) -> dict[str, ImageObjects]:
    """Pascal VOC / ImageNet XML files under ``root``: an image per file, named by its
    ``<filename>`` (in the XML's own sub-folder of ``root``; the XML's path without
    ``.xml`` when it has none); 1-based inclusive ``<bndbox>`` -> continuous boxes."""
    images: dict[str, ImageObjects] = {}
    found = False
    for path in _walk(root, ".xml"):
        found = True
        rel = path.relative_to(root).as_posix()
        filename, boxes = _read_voc(path)
        folder = str(PurePosixPath(rel).parent)
        if filename is None:
            name = rel[: -len(".xml")]
        else:
            name = filename if folder == "." else f"{folder}/{filename}"
        _add(images, name, boxes)
    if not found:
        raise UsageError(f"--boxes {root}: no .xml annotation files in this folder")
    return images


def _read_voc(path: Path) -> tuple[str | None, list[Obj]]:
    """One VOC XML file: its ``<filename>`` (None when absent) and its boxes."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        line, column = exc.position
        reason = str(exc).split(":")[0]
        raise UsageError(f"--boxes {path}:{line}: malformed XML ({reason}, column "
                         f"{column + 1})") from None
    except OSError as exc:
        raise UsageError(f"--boxes {path}: cannot read ({exc.strerror or exc})") from None
    if root.tag != "annotation":
        raise UsageError(f"--boxes {path}: not a Pascal VOC annotation (the root element is "
                         f"<{root.tag}>, not <annotation>)")
    filename = (root.findtext("filename") or "").strip() or None
    boxes = []
    for i, obj in enumerate(root.iter("object"), 1):
        where = f"--boxes {path}: <object> {i}"
        label = (obj.findtext("name") or "").strip() or None
        box = obj.find("bndbox")
        if box is None:
            raise UsageError(f"{where}: no <bndbox>")
        values = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = box.findtext(tag)
            if text is None:
                raise UsageError(f"{where}: <bndbox> has no <{tag}>")
            values.append(_number(where, tag, text.strip()))
        xmin, ymin, xmax, ymax = values
        boxes.append(_box(where, xmin - 1, ymin - 1, xmax, ymax, label))
    return filename, boxes


def _read_coco(path: Path) -> dict[str, ImageObjects]:
    """A COCO instances JSON: ``images[].file_name``; ``annotations[].bbox`` [x, y, w, h]
    (continuous) labelled by ``categories[].name`` of its ``category_id``. Images without
    annotations are annotated with no box."""
    try:
        data = json.loads(_read_text(path, "--boxes"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"--boxes {path}:{exc.lineno}: malformed JSON ({exc.msg}, column "
                         f"{exc.colno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UsageError(f"--boxes {path}: not a COCO instances file (no \"images\" list)")
    names: dict[Any, str] = {}
    images: dict[str, ImageObjects] = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) \
                or "id" not in image:
            raise UsageError(f"--boxes {path}: images[{i}] needs \"id\" and \"file_name\"")
        _check_id(path, f"images[{i}].id", image["id"])
        names[image["id"]] = image["file_name"]
        _add(images, image["file_name"], [])
    categories = {}
    for i, c in enumerate(data.get("categories") or []):
        if isinstance(c, dict):
            _check_id(path, f"categories[{i}].id", c.get("id"))
            categories[c.get("id")] = str(c.get("name"))
    for i, ann in enumerate(data.get("annotations") or []):
        where = f"--boxes {path}: annotations[{i}]"
        if isinstance(ann, dict) and "image_id" in ann:
            _check_id(path, f"annotations[{i}].image_id", ann["image_id"])
        if not isinstance(ann, dict) or ann.get("image_id") not in names:
            raise UsageError(f"{where}: \"image_id\" names no image in \"images\"")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise UsageError(f"{where}: \"bbox\" must be [x, y, width, height]")
        x, y, w, h = (_number(where, f, v) for f, v in zip(("x", "y", "width", "height"),
                                                           bbox))
        cat = ann.get("category_id")
        if cat is not None:
            _check_id(path, f"annotations[{i}].category_id", cat)
        if categories and cat not in categories:
            raise UsageError(f"{where}: category_id {cat!r} is not in \"categories\"")
        label = categories.get(cat)  # ids without "categories" name no class: no label
        images[names[ann["image_id"]]].boxes.append(_box(where, x, y, x + w, y + h, label))
    return images


def _check_id(path: Path, where: str, value: Any) -> None:
    """A COCO id is a number or a string (anything else cannot be looked up)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"--boxes {path}: {where} must be a number or a string, got "
                         f"{type(value).__name__}")


def _read_csv(path: Path) -> dict[str, ImageObjects]:
    """A CSV ``path,x0,y0,x1,y1[,label]``: one box per row, several rows per image, an
    optional header (a first row whose four coordinate fields are none of them numbers), blank lines skipped."""
    images: dict[str, ImageObjects] = {}
    reader = csv.reader(_read_text(path, "--boxes").splitlines())
    first = True
    try:
        for row in reader:
            if not row or all(not f.strip() for f in row):
                continue
            where = f"--boxes {path}:{reader.line_num}"
            if first and len(row) in (5, 6) and not any(map(_is_number, row[1:5])):
                first = False
                continue  # the header
            first = False
            if len(row) not in (5, 6):
                raise UsageError(f"{where}: expected 5 or 6 fields (path,x0,y0,x1,y1[,label])"
                                 f", got {len(row)}")
            name = row[0].strip()
            if not name:
                raise UsageError(f"{where}: the path is empty")
            x0, y0, x1, y1 = (_number(where, f, v.strip()) for f, v in zip(_CSV_FIELDS,
                                                                           row[1:5]))
            label = (row[5].strip() or None) if len(row) == 6 else None
            _add(images, name, [_box(where, x0, y0, x1, y1, label)])
    except csv.Error as exc:
        raise UsageError(f"--boxes {path}:{reader.line_num}: malformed CSV ({exc})") from None
    if not images:
        raise UsageError(f"--boxes {path}: no boxes (expected rows path,x0,y0,x1,y1[,label])")
    return images


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_masks(root: Path) -> dict[str, ImageObjects]:
    """Mask PNGs under ``root`` (recursive), each named by its path relative to ``root``."""
    if not root.is_dir():
        raise UsageError(f"--masks {root}: not a folder (give a folder of mask PNGs)")
    images = {p.relative_to(root).as_posix(): ImageObjects(p.relative_to(root).as_posix(),
                                                           [], mask=p)
              for p in _walk(root, ".png")}
    if not images:
        raise UsageError(f"--masks {root}: no .png files in this folder")
    return images
