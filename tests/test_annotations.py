"""--boxes / --masks readers (fgcli.audit.annotations): every format from small files written
here, matching by path and by stem, the summary line, malformed files (one line naming file
and line) and the class / any / absent rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgcli.audit.annotations import Obj, boxes_for, read_annotations
from fgcli.errors import UsageError

VOC = """<annotation>
  <folder>VOC2007</folder>
  <filename>{filename}</filename>
  <size><width>100</width><height>80</height><depth>3</depth></size>
  {objects}
</annotation>
"""
OBJECT = ("<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
          "<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def _voc(folder: Path, rel: str, filename: str | None, *objects: tuple) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(OBJECT.format(name=n, x0=a, y0=b, x1=c, y1=d) for n, a, b, c, d in objects)
    text = VOC.format(filename=filename or "", objects=body)
    if filename is None:
        text = text.replace("<filename></filename>", "")
    path.write_text(text, encoding="utf-8")


def _error(tmp_path: Path, name: str, text: str, **kwargs: str) -> str:
    """The one-line UsageError of reading ``text`` written to ``name``."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as info:
        read_annotations(boxes=str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ formats

def test_voc_folder_is_read_recursively_with_one_based_inclusive_boxes(tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    _voc(ann, "000001.xml", "000001.jpg", ("dog", 1, 1, 10, 20), ("person", 5.5, 6, 7, 8))
    _voc(ann, "n01440764/n01440764_1.xml", "n01440764_1", ("n01440764", 2, 3, 4, 5))
    _voc(ann, "sub/nofilename.xml", None)
    a = read_annotations(boxes=str(ann))
    assert a.source == "boxes" and a.path == ann and len(a) == 3
    one = a.find("000001.jpg")
    assert one is not None and one.name == "000001.jpg"
    # xmin=1 .. xmax=10 (1-based, inclusive) covers continuous [0, 10]
    assert one.boxes == [Obj(0.0, 0.0, 10.0, 20.0, "dog"), Obj(4.5, 5.0, 7.0, 8.0, "person")]
    # <filename> without extension, in the XML's sub-folder: matches the image by path
    fish = a.find("n01440764/n01440764_1.JPEG")
    assert fish is not None and fish.boxes == [Obj(1.0, 2.0, 4.0, 5.0, "n01440764")]
    # no <filename>: the XML's own path names the image; no <object>: no box
    empty = a.find("sub/nofilename.png")
    assert empty is not None and empty.boxes == []


def test_coco_json(tmp_path: Path) -> None:
    coco = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "bbox": [10, 20, 30, 40], "category_id": 3},
                            {"image_id": 7, "bbox": [0.5, 0, 1, 1], "category_id": 1}],
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "tabby"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco, indent=1), encoding="utf-8")
    a = read_annotations(boxes=str(path))
    hit = a.find("a.jpg")
    assert hit is not None
    assert hit.boxes == [Obj(10, 20, 40, 60, "tabby"), Obj(0.5, 0, 1.5, 1, "person")]
    none = a.find("b.jpg")  # listed without annotations: annotated, with no box
    assert none is not None and none.boxes == []


@pytest.mark.parametrize("header", ["path,x0,y0,x1,y1,label\n", ""])
def test_csv_with_and_without_header_several_rows_per_image(tmp_path: Path,
                                                            header: str) -> None:
    path = tmp_path / "boxes.csv"
    path.write_text(header + "a.jpg,1,2,3,4,cat\n\nsub/b.png,0,0,5.5,6\na.jpg, 10, 20, 30, "
                    "40 ,dog\n", encoding="utf-8")
    a = read_annotations(boxes=str(path))
    assert len(a) == 2
    first = a.find("a.jpg")
    assert first is not None
    assert first.boxes == [Obj(1, 2, 3, 4, "cat"), Obj(10, 20, 30, 40, "dog")]
    second = a.find("sub/b.png")
    assert second is not None and second.boxes == [Obj(0, 0, 5.5, 6, None)]


def test_txt_is_csv_and_other_suffixes_are_refused(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("a.jpg,1,2,3,4\n", encoding="utf-8")
    assert read_annotations(boxes=str(tmp_path / "b.txt")).find("a.jpg") is not None
    message = _error(tmp_path, "b.yaml", "a: 1\n")
    assert "b.yaml" in message and "unknown format" in message
    with pytest.raises(UsageError, match="no such file"):
        read_annotations(boxes=str(tmp_path / "missing.csv"))
    with pytest.raises(UsageError, match="not both"):
        read_annotations(boxes=str(tmp_path / "b.txt"), masks=str(tmp_path))


def test_masks_folder(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    (masks / "sub").mkdir(parents=True)
    grey = np.zeros((4, 6), np.uint8)
    grey[1:3, 2:4] = 255
    Image.fromarray(grey).save(masks / "sub" / "a.png")
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 0, 2] = 1
    Image.fromarray(rgb).save(masks / "b.png")
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black: no object (alpha is not an object)
    Image.fromarray(rgba).save(masks / "c.png")
    (masks / "broken.png").write_bytes(b"not a png")
    a = read_annotations(masks=str(masks))
    assert a.source == "masks" and len(a) == 4
    one = a.find("sub/a.jpg")  # same path, other extension
    assert one is not None and one.boxes == [] and one.mask == masks / "sub" / "a.png"
    np.testing.assert_array_equal(one.mask_array(), grey != 0)
    two = a.find("b.jpeg")
    assert two is not None and two.mask_array().sum() == 1 and two.mask_array()[0, 0]
    three = a.find("c.jpg")
    assert three is not None and not three.mask_array().any()
    bad = a.find("broken.jpg")  # read lazily: fails only when its image uses it
    assert bad is not None
    with pytest.raises(ValueError) as info:
        bad.mask_array()
    assert "broken.png" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UsageError, match="not a folder"):
        read_annotations(masks=str(masks / "b.png"))


# ------------------------------------------------------------------------------ matching

def test_matching_by_path_then_unique_stem_and_the_summary(tmp_path: Path) -> None:
    path = tmp_path / "boxes.csv"
    path.write_text("photos/x.jpg,0,0,1,1\n"      # stem x unique: matches "other/x.png"
                    "a/dup.jpg,0,0,1,1\nb/dup.jpg,0,0,2,2\n"  # stem dup shared: ambiguous
                    "same.jpg,0,0,1,1\nsame.png,0,0,3,3\n"    # same path, two extensions
                    "lonely.jpg,0,0,1,1\n", encoding="utf-8")
    a = read_annotations(boxes=str(path))
    x = a.find("other/x.png")
    assert x is not None and x.name == "photos/x.jpg"
    assert a.find("c/dup.jpg") is None  # stem shared by two annotations
    found = a.find("b/dup.jpg")  # the path still matches
    assert found is not None and found.name == "b/dup.jpg"
    png = a.find("same.png")  # several share the path: the exact name wins
    assert png is not None and png.boxes[0].x1 == 3
    assert a.find("same.gif") is None
    assert a.find("./photos\\x.jpg") is not None
    keys = ["other/x.png", "b/dup.jpg", "c/dup.jpg", "same.png", "nothing.jpg"]
    assert a.summary(keys) == ("boxes: 3 of 5 images annotated; 2 without an annotation "
                               "(1 with a stem shared by several annotations); "
                               "3 annotations match no image")
    assert a.summary(["lonely.jpg"]) == ("boxes: 1 of 1 image annotated; 0 without an "
                                         "annotation; 5 annotations match no image")


def test_summary_of_the_brief(tmp_path: Path) -> None:
    rows = "".join(f"{n}.jpg,0,0,1,1\n" for n in "abcdefg")
    (tmp_path / "b.csv").write_text(rows, encoding="utf-8")
    a = read_annotations(boxes=str(tmp_path / "b.csv"))
    keys = [f"{n}.jpg" for n in "abcdz"] + ["sub/e.png"]
    assert a.summary(keys) == ("boxes: 5 of 6 images annotated; 1 without an annotation; "
                               "2 annotations match no image")


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("row, reason", [
    ("a.jpg,1,2,3", "expected 5 or 6 fields"),
    ("a.jpg,1,2,3,4,cat,extra", "expected 5 or 6 fields"),
    ("a.jpg,1,two,3,4", "y0 is not a number: 'two'"),
    ("a.jpg,5,2,5,4", "x0 (5) must be less than x1 (5)"),
    ("a.jpg,1,9,3,4", "y0 (9) must be less than y1 (4)"),
    ("a.jpg,1,2,nan,4", "x1 is not finite"),
    (",1,2,3,4", "the path is empty"),
])
def test_a_bad_csv_row_is_one_line_naming_file_and_line(tmp_path: Path, row: str,
                                                        reason: str) -> None:
    message = _error(tmp_path, "b.csv", f"path,x0,y0,x1,y1\nok.jpg,0,0,1,1\n\n{row}\n")
    assert message.startswith(f"--boxes {tmp_path / 'b.csv'}:4: "), message
    assert reason in message


def test_a_non_number_on_the_first_row_is_not_taken_for_a_header(tmp_path: Path) -> None:
    message = _error(tmp_path, "b.csv", "a.jpg,1,x,3,4\n")
    assert message == f"--boxes {tmp_path / 'b.csv'}:1: y0 is not a number: 'x'"


def test_malformed_xml_names_file_and_line(tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    _voc(ann, "good.xml", "good.jpg", ("dog", 1, 1, 2, 2))
    (ann / "sub").mkdir()
    (ann / "sub" / "bad.xml").write_text("<annotation>\n<filename>a.jpg</filename>\n"
                                         "<object>\n</annotation>\n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        read_annotations(boxes=str(ann))
    message = str(info.value)
    assert message.startswith(f"--boxes {ann / 'sub' / 'bad.xml'}:4: malformed XML"), message
    assert "\n" not in message


def test_bad_voc_boxes_name_the_file_and_object(tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    _voc(ann, "a.xml", "a.jpg", ("dog", 1, 1, 2, 2), ("cat", 5, 1, 3, 2))
    with pytest.raises(UsageError, match=r"a\.xml: <object> 2: empty box"):
        read_annotations(boxes=str(ann))
    _voc(ann, "a.xml", "a.jpg", ("dog", "one", 1, 2, 2))
    with pytest.raises(UsageError, match=r"a\.xml: <object> 1: xmin is not a number"):
        read_annotations(boxes=str(ann))
    (ann / "a.xml").write_text("<html/>", encoding="utf-8")
    with pytest.raises(UsageError, match="not a Pascal VOC annotation"):
        read_annotations(boxes=str(ann))
    (ann / "a.xml").unlink()
    with pytest.raises(UsageError, match="no .xml annotation files"):
        read_annotations(boxes=str(ann))


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    message = _error(tmp_path, "c.json", '{"images": [\n{"id": 1, "file_name": "a.jpg"},\n]}')
    assert message.startswith(f"--boxes {tmp_path / 'c.json'}:3: malformed JSON"), message
    bad_box = {"images": [{"id": 1, "file_name": "a.jpg"}],
               "annotations": [{"image_id": 1, "bbox": [1, 2, -3, 4], "category_id": 1}],
               "categories": [{"id": 1, "name": "dog"}]}
    message = _error(tmp_path, "c.json", json.dumps(bad_box))
    assert "c.json: annotations[0]: empty box" in message
    bad_box["annotations"][0]["image_id"] = 2  # type: ignore[index]
    assert "names no image" in _error(tmp_path, "c.json", json.dumps(bad_box))
    assert "not a COCO instances file" in _error(tmp_path, "c.json", "[]")


# ------------------------------------------------------------------------------ classes

def test_labels_name_classes_by_name_or_index(tmp_path: Path) -> None:
    categories = ["tench", "tabby cat", "Egyptian cat"]

    def annotations(labels: str) -> object:
        path = tmp_path / "b.csv"
        path.write_text("".join(f"a.jpg,0,0,1,1,{lab}\n" for lab in labels.split()),
                        encoding="utf-8")
        return read_annotations(boxes=str(path))

    assert annotations("tabby_Cat egyptian_cat").names_classes(categories, 3)
    assert annotations("0 2").names_classes(categories, 3)
    assert annotations("0 1").names_classes(None, 3)  # no category names: indices only
    assert not annotations("0 tench").names_classes(None, 3)
    assert not annotations("3").names_classes(categories, 3)  # index out of range
    assert not annotations("tabby_cat person").names_classes(categories, 3)  # one does not
    (tmp_path / "b.csv").write_text("a.jpg,0,0,1,1\n", encoding="utf-8")
    assert not read_annotations(boxes=str(tmp_path / "b.csv")).names_classes(categories, 3)


def test_boxes_for_class_any_absent(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text("a.jpg,0,0,1,1,tabby_cat\na.jpg,2,2,3,3,dog\na.jpg,4,4,5,5,281\n"
                    "e.jpg,0,0,1,1,dog\n", encoding="utf-8")
    a = read_annotations(boxes=str(path))
    image = a.find("a.jpg")
    assert image is not None
    used, match = boxes_for(image, 281, "tabby cat", by_class=True)
    assert match == "class" and [o.x0 for o in used] == [0, 4]  # by name and by index
    used, match = boxes_for(image, 5, "tench", by_class=True)
    assert (used, match) == ([], "absent")
    used, match = boxes_for(image, 5, "tench", by_class=False)
    assert match == "any" and used == image.boxes
    empty = read_annotations(boxes=str(path)).find("e.jpg")
    assert empty is not None
    empty.boxes.clear()  # an image annotated with no box: nothing to point at
    assert boxes_for(empty, 5, "tench", by_class=False) == ([], "absent")
    mask = tmp_path / "m"
    mask.mkdir()
    Image.fromarray(np.ones((2, 2), np.uint8)).save(mask / "a.png")
    found = read_annotations(masks=str(mask)).find("a.jpg")
    assert found is not None and boxes_for(found, 5, "tench", by_class=True) == ([], "any")


def test_a_box_without_a_label_makes_every_box_count(tmp_path: Path) -> None:
    csv = tmp_path / "b.csv"
    csv.write_text("a.jpg,0,0,5,5,tabby\nb.jpg,0,0,5,5\n")
    ann = read_annotations(boxes=str(csv))
    assert not ann.names_classes(["tabby"], 1000)  # b.jpg's box names no class
    assert boxes_for(ann.find("b.jpg"), 281, "tabby", False)[1] == "any"


def test_coco_ids_must_be_numbers_or_strings_and_ids_without_categories_are_no_labels(
        tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": [{"id": [1], "file_name": "a.jpg"}]}))
    with pytest.raises(UsageError, match=r"images\[0\]\.id must be a number or a string"):
        read_annotations(boxes=str(path))
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 1, "bbox": [0, 0, 4, 4],
                                                 "category_id": 3}]}))
    ann = read_annotations(boxes=str(path))
    assert ann.find("a.jpg").boxes[0].label is None
    assert not ann.names_classes(None, 1000)  # category 3 is not ImageNet's class 3


def test_spellings_of_one_path_are_one_image(tmp_path: Path) -> None:
    csv = tmp_path / "b.csv"
    csv.write_text("./sub/a.jpg,0,0,5,5\nsub\\a.jpg,1,1,6,6\nsub/a.jpg,2,2,7,7\n")
    ann = read_annotations(boxes=str(csv))
    assert len(ann) == 1 and len(ann.find("sub/a.jpg").boxes) == 3


def test_the_identity_follows_the_content_not_the_path(tmp_path: Path) -> None:
    csv = tmp_path / "b.csv"
    csv.write_text("a.jpg,0,0,5,5,cat\n")
    first = read_annotations(boxes=str(csv)).identity()
    again = read_annotations(boxes=str(tmp_path / "." / "b.csv")).identity()
    csv.write_text("a.jpg,0,0,5,6,cat\n")
    edited = read_annotations(boxes=str(csv)).identity()
    assert first == again != edited
