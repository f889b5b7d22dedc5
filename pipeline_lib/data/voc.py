"""Read PASCAL VOC datasets (VOCdevkit layout) into plain rows, strictly and safely.

A dataset folder (e.g. `VOCdevkit/VOC2007`) holds `Annotations/<id>.xml`, `JPEGImages/<file>` and
`ImageSets/Main/<split>.txt` (one image id per line). Rules, chosen because real VOC files break
naive parsers:

- XML is parsed with defusedxml (entity expansion and external entities are refused).
- Objects are the *direct* `<object>` children of `<annotation>`: the `<part>` elements of person
  layouts (hand, head, foot) carry their own `<name>`/`<bndbox>` but are not objects, and
  `<owner><name>` is a person, not a class.
- Defaults for optional fields: `difficult`, `truncated` -> False; `occluded` -> missing (None, as
  in all of VOC2007); `pose` -> "Unspecified"; `segmented` -> False; `depth` -> 3.
- Coordinates are kept exactly as written (VOC's 1-based pixels); decimals (a few VOC2012 files)
  are accepted. A box must satisfy 0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height.
- `<filename>` must be a bare file name inside JPEGImages/ (no `/`, `\\`, `..`, absolute paths),
  and the image's real size must equal the XML's `<size>`: what the annotation *text* names stays
  inside the dataset folder. The files themselves may be links (DVC's symlink or hardlink cache
  after `dvc add`, a folder merging two VOC years): where a link points is the user's choice.

Every problem raises `AnnotationError` naming the file and the field; `read_voc(on_error="skip")`
instead drops that image and records why.
"""

from __future__ import annotations

import math
import os
import re
import tarfile
import tempfile
import urllib.error
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import defusedxml
import defusedxml.ElementTree
from defusedxml.ElementTree import ParseError
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline_lib.base.errors import PipelineError

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# Image ids: letters of any script, digits, "_", "." and "-"; no spaces or slashes, no leading "."
IMAGE_ID = re.compile(r"^[^\W_][\w.-]*$")
MAX_ANNOTATION_BYTES = 1 << 20  # a VOC annotation is 1-3 KB; anything this large is not one


class DatasetError(PipelineError, ValueError):
    """The dataset as a whole cannot be read (missing folder or split list, conflicting splits)."""


class AnnotationError(DatasetError):
    """One image's annotation or image file is invalid; `file` and `field` say where."""

    def __init__(self, file: str | Path, field: str, message: str):
        self.file, self.field, self.message = str(file), field, message
        super().__init__(f"{file}: {field}: {message}")


@dataclass
class VocRows:
    """What `read_voc` found: one dict per image and per object, and the images it skipped."""

    images: list[dict] = field(default_factory=list)
    objects: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"image_id", "split", "reason"}


def read_split(dataset_dir: Path, split: str) -> list[str]:
    """Image ids listed in `ImageSets/Main/<split>.txt`, in file order."""
    path = dataset_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        folder = path.parent
        known = sorted(p.stem for p in folder.glob("*.txt") if "_" not in p.stem)
        hint = f"; lists there: {', '.join(known)}" if known else ""
        raise DatasetError(f"{path}: split list not found{hint}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    ids = [line.strip() for line in lines if line.strip()]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise DatasetError(f"{path}: ids listed twice: {', '.join(duplicates[:5])}")
    return ids


def parse_annotation(xml_path: Path, class_ids: Mapping[str, int]) -> tuple[dict, list[dict]]:
    """Parse one VOC XML file into an image row and its object rows (see the module rules).

    The image row has: filename, width, height, depth, segmented. Each object row has:
    object_index, class_name, class_id, xmin, ymin, xmax, ymax, difficult, truncated, occluded,
    pose.
    """
    root = _read_root(xml_path)
    image = _image_row(xml_path, root)
    objects = [
        _object_row(xml_path, obj, index, class_ids, image)
        for index, obj in enumerate(root.findall("object"))  # direct children only: not <part>
    ]
    return image, objects


def _read_root(xml_path: Path):
    """The <annotation> element of a file no larger than MAX_ANNOTATION_BYTES, parsed safely."""
    try:
        size = xml_path.stat().st_size
    except OSError as exc:
        raise AnnotationError(xml_path, "xml", f"cannot read ({exc.strerror})") from None
    if size > MAX_ANNOTATION_BYTES:
        raise AnnotationError(
            xml_path,
            "xml",
            f"{size:,} bytes: larger than {MAX_ANNOTATION_BYTES:,}, not a VOC annotation",
        )
    try:
        root = defusedxml.ElementTree.parse(xml_path).getroot()
    except ParseError as exc:
        raise AnnotationError(xml_path, "xml", f"malformed XML ({exc})") from None
    except (LookupError, UnicodeError) as exc:  # an encoding Python does not know, bad bytes
        raise AnnotationError(xml_path, "xml", f"malformed XML: {exc}") from None
    except defusedxml.DefusedXmlException as exc:
        raise AnnotationError(xml_path, "xml", f"refused unsafe XML ({exc})") from None
    except OSError as exc:
        raise AnnotationError(xml_path, "xml", f"cannot read ({exc.strerror})") from None
    if root.tag != "annotation":
        raise AnnotationError(xml_path, "annotation", f"root element is <{root.tag}>")
    return root


def _image_row(xml_path: Path, root) -> dict:
    filename = _text(xml_path, root, "filename")
    if not is_bare_filename(filename):
        raise AnnotationError(
            xml_path, "filename", f"{filename!r} is not a plain file name inside JPEGImages/"
        )
    size = _child(xml_path, root, "size")
    return {
        "filename": filename,
        "width": _integer(xml_path, size, "width", "size/width"),
        "height": _integer(xml_path, size, "height", "size/height"),
        "depth": _integer(xml_path, size, "depth", "size/depth", default=3),
        "segmented": _flag(xml_path, root, "segmented", "segmented"),
    }


def _object_row(xml_path: Path, obj, index: int, class_ids: Mapping[str, int], image: dict) -> dict:
    where = f"object[{index}]"
    name = _text(xml_path, obj, "name", f"{where}/name")
    if name not in class_ids:
        known = ", ".join(class_ids)
        raise AnnotationError(xml_path, f"{where}/name", f"unknown class {name!r} ({known})")
    box = _child(xml_path, obj, "bndbox", f"{where}/bndbox")
    xmin, ymin, xmax, ymax = (
        _number(xml_path, box, key, f"{where}/bndbox/{key}")
        for key in ("xmin", "ymin", "xmax", "ymax")
    )
    width, height = image["width"], image["height"]
    if not (0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height):
        raise AnnotationError(
            xml_path,
            f"{where}/bndbox",
            f"box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) is empty or outside the "
            f"{width}x{height} image",
        )
    difficult = _flag(xml_path, obj, "difficult", f"{where}/difficult")
    truncated = _flag(xml_path, obj, "truncated", f"{where}/truncated")
    occluded = None
    if obj.find("occluded") is not None:
        occluded = _flag(xml_path, obj, "occluded", f"{where}/occluded")
    return {
        "object_index": index,
        "class_name": name,
        "class_id": class_ids[name],
        "xmin": xmin,
        "ymin": ymin,
        "xmax": xmax,
        "ymax": ymax,
        "difficult": difficult,
        "truncated": truncated,
        "occluded": occluded,
        "pose": (obj.findtext("pose") or "").strip() or "Unspecified",
    }


def read_image_entry(dataset_dir: Path, image_id: str, class_ids: Mapping[str, int]) -> tuple:
    """Parse `<id>.xml`, check its image exists with the stated size; return (image, objects).

    The image row gains `image_id`, `path` and `annotation` (both relative to `dataset_dir`) and
    `n_objects`; object rows gain `image_id`. The id (from the split list) and `<filename>` must
    be plain names, so both paths stay inside `dataset_dir`; files and folders may be links.
    """
    if not IMAGE_ID.match(image_id):
        raise AnnotationError(
            dataset_dir / "ImageSets" / "Main", "id", f"{image_id!r} is not a plain image id"
        )
    xml_rel = Path("Annotations") / f"{image_id}.xml"
    xml_path = dataset_dir / xml_rel
    if not xml_path.is_file():
        raise AnnotationError(xml_path, "file", "annotation listed in the split does not exist")
    image, objects = parse_annotation(xml_path, class_ids)
    image_rel = Path("JPEGImages") / image["filename"]
    real_size = read_image_size(dataset_dir / image_rel, xml_path)
    if real_size != (image["width"], image["height"]):
        raise AnnotationError(
            xml_path,
            "size",
            f"says {image['width']}x{image['height']} but {image_rel} is "
            f"{real_size[0]}x{real_size[1]}",
        )
    image.update(
        image_id=image_id,
        path=image_rel.as_posix(),
        annotation=xml_rel.as_posix(),
        n_objects=len(objects),
    )
    for obj in objects:
        obj["image_id"] = image_id
    return image, objects


def read_voc(
    dataset_dir: str | Path,
    splits: Mapping[str, str],
    classes: Sequence[str],
    on_error: str = "raise",
    progress: bool = True,
) -> VocRows:
    """Read the images of several split lists, e.g. `{"train": "train", "val": "val"}`.

    Keys of `splits` are the roles written to the `split` column, values the ImageSets/Main list
    names. `classes` fixes the class ids (position in the list). With `on_error="skip"` an invalid
    image is dropped and recorded in `VocRows.skipped`; with "raise" the first one raises.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "Annotations").is_dir():
        raise DatasetError(f"{dataset_dir}: not a VOC dataset folder (no Annotations/ inside)")
    class_ids = {name: i for i, name in enumerate(classes)}
    listed = {role: read_split(dataset_dir, name) for role, name in splits.items()}
    _check_disjoint(listed, splits)

    rows = VocRows()
    work = [(role, image_id) for role, ids in listed.items() for image_id in ids]
    for role, image_id in tqdm(work, desc="parse annotations", unit="file", disable=not progress):
        try:
            image, objects = read_image_entry(dataset_dir, image_id, class_ids)
        except AnnotationError as exc:
            if on_error == "raise":
                raise
            rows.skipped.append({"image_id": image_id, "split": role, "reason": str(exc)})
            continue
        image["split"] = role
        rows.images.append(image)
        rows.objects.extend(objects)
    return rows


def download_voc2012(dest: str | Path, url: str | None = None, md5: str | None = None) -> Path:
    """Fetch and unpack VOC2012 trainval with torchvision's downloader (MD5 verified).

    Unpacks into `dest/VOCdevkit/VOC2012` and returns that folder; does nothing if it already holds
    annotations. `url`/`md5` default to torchvision's; they are parameters so tests can serve a
    small archive locally. A failed or corrupt download leaves no archive behind.
    """
    from torchvision.datasets.utils import download_url
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    info = DATASET_YEAR_DICT["2012"]
    url, md5 = url or info["url"], md5 or info["md5"]
    dest = Path(dest)
    dataset_dir = dest / "VOCdevkit" / "VOC2012"
    if (dataset_dir / "Annotations").is_dir():
        return dataset_dir
    archive = dest / info["filename"]
    manual = (
        f"Without internet, download {url} yourself, unpack it so that "
        f"{dataset_dir}/Annotations exists, and run again (or point data.root at an existing "
        "VOCdevkit folder and set data.download: false)."
    )
    try:
        download_url(url, str(dest), filename=info["filename"], md5=md5)
        _unpack_voc(archive, dataset_dir)
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetError(f"could not download VOC2012 from {url}: {exc}. {manual}") from None
    except RuntimeError as exc:  # torchvision: "File not found or corrupted." (MD5 mismatch)
        raise DatasetError(
            f"{info['filename']} from {url} failed its MD5 check ({exc}). {manual}"
        ) from None
    except tarfile.TarError as exc:
        raise DatasetError(f"{archive}: cannot unpack ({exc}). {manual}") from None
    finally:
        archive.unlink(missing_ok=True)
    return dataset_dir


def _unpack_voc(archive: Path, dataset_dir: Path) -> None:
    """Unpack into a temporary folder, then move VOCdevkit/<year> into place as a whole.

    Not torchvision's extract_archive: tarfile's "data" filter refuses members that would land
    outside the folder (absolute paths, `..`, links pointing out).
    """
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".unpack.") as tmp:
        with tarfile.open(archive) as tar:
            _extract_inside(tar, tmp)
        unpacked = Path(tmp) / "VOCdevkit" / dataset_dir.name
        if not (unpacked / "Annotations").is_dir():
            raise DatasetError(f"{archive.name} holds no VOCdevkit/{dataset_dir.name}/Annotations")
        dataset_dir.parent.mkdir(exist_ok=True)  # dest/VOCdevkit: dest holds the archive
        os.replace(unpacked, dataset_dir)


def _extract_inside(tar: tarfile.TarFile, folder: str) -> None:
    """Every member of `tar` into `folder`, none outside it: tarfile's "data" filter (Python
    3.11.4 on); before it (Debian 12's 3.11.2), only plain files and folders at relative paths
    without `..` (VOC's archives hold nothing else), else tarfile.TarError naming the member."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(folder, filter="data")
        return
    for member in tar.getmembers():
        path = Path(member.name)
        if not (member.isfile() or member.isdir()) or path.is_absolute() or ".." in path.parts:
            raise tarfile.TarError(f"{member.name!r} is not a file or folder inside the archive")
    tar.extractall(folder)  # every member checked above


# --- small helpers ------------------------------------------------------------------------------


def _check_disjoint(listed: Mapping[str, list[str]], splits: Mapping[str, str]) -> None:
    roles = list(listed)
    for i, a in enumerate(roles):
        for b in roles[i + 1 :]:
            common = sorted(set(listed[a]) & set(listed[b]))
            if common:
                raise DatasetError(
                    f"splits {splits[a]!r} and {splits[b]!r} share {len(common)} images "
                    f"(e.g. {', '.join(common[:3])}); pick disjoint lists"
                )


def is_bare_filename(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0:")
        and name == name.strip()
    )


def read_image_size(path: Path, xml_path: Path) -> tuple[int, int]:
    if not path.is_file():
        raise AnnotationError(xml_path, "filename", f"image {path} does not exist")
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise AnnotationError(path, "image", f"not a readable image ({exc})") from None


def _child(xml_path: Path, parent: Any, tag: str, where: str | None = None) -> Any:
    node = parent.find(tag)
    if node is None:
        raise AnnotationError(xml_path, where or tag, "missing")
    return node


def _text(xml_path: Path, parent: Any, tag: str, where: str | None = None) -> str:
    text = (_child(xml_path, parent, tag, where).text or "").strip()
    if not text:
        raise AnnotationError(xml_path, where or tag, "empty")
    return text


def _number(xml_path: Path, parent: Any, tag: str, where: str) -> float:
    text = _text(xml_path, parent, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(xml_path, where, f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise AnnotationError(xml_path, where, f"{text!r} is not a finite number")
    return value


def _integer(xml_path: Path, parent: Any, tag: str, where: str, default: int | None = None):
    if default is not None and parent.find(tag) is None:
        return default
    value = _number(xml_path, parent, tag, where)
    if value != int(value) or value <= 0:
        raise AnnotationError(xml_path, where, f"{value:g} is not a positive whole number")
    return int(value)


def _flag(xml_path: Path, parent: Any, tag: str, where: str) -> bool:
    """A 0/1 field; missing means False."""
    if parent.find(tag) is None:
        return False
    value = _number(xml_path, parent, tag, where)
    if value not in (0, 1):
        raise AnnotationError(xml_path, where, f"{value:g} is not 0 or 1")
    return bool(value)
