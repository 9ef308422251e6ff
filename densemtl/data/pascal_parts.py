"""PASCAL-Part person annotations -> the 7-class human-parts map of the PASCAL-Context multi-task benchmark.

The multi-task release keeps PASCAL-Part's annotation per image under ``human_parts/<name>.mat``: a
struct ``anno`` with ``imname`` and ``objects``; each object has ``class``, ``class_ind`` (VOC index,
person = 15), ``mask`` (uint8, image size) and ``parts`` (``part_name``, ``mask``; 0 x 0 when the
object has no part annotation).

The mapping follows the field's loaders (ASTMT, MTI-Net, ATRC, InvPT, 6-part setting) exactly:

==  ==========  ====================================================================
id  class       PASCAL-Part part names
==  ==========  ====================================================================
0   background  every pixel of an image with person parts that no person part covers
1   head        head, hair, leye, reye, lear, rear, lebrow, rebrow, nose, mouth
2   torso       torso, neck
3   upper arm   luarm, ruarm
4   lower arm   llarm, rlarm, lhand, rhand
5   upper leg   luleg, ruleg
6   lower leg   llleg, rlleg, lfoot, rfoot
==  ==========  ====================================================================

Only objects with ``class_ind == 15`` that have part annotations contribute; their part masks are
painted in file order (objects, then parts), a later part overwriting an earlier one where masks
overlap. Parts of other objects (dog heads, car wheels, ...) stay background. An image where no
person part covers any pixel is all ignore (255): the field's loaders return zeros for it and their
``AddIgnoreRegions`` step turns an all-zero parts map into 255, so such images neither train
"background" nor count in the mIoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densemtl.constants import IGNORE_INDEX
from densemtl.data.files import read_mat
from densemtl.errors import DataError

PERSON_CLASS = 15
PART_CLASS_NAMES = ["background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg"]
PART_GROUPS: dict[str, int] = {
    **dict.fromkeys(("head", "hair", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth"), 1),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}


@dataclass
class PartObject:
    """One annotated object of a PASCAL-Part file."""

    class_name: str
    class_index: int
    mask: np.ndarray  # bool H x W
    parts: list[tuple[str, np.ndarray]]  # (part name, bool H x W mask)


def _text(value: np.ndarray) -> str:
    return str(np.asarray(value).squeeze())


def read_part_objects(path: Path) -> list[PartObject]:
    """The objects of a PASCAL-Part ``.mat`` file, in file order."""
    anno = read_mat(path, "anno")
    try:
        record = anno.ravel()[0]
        objects = []
        for obj in np.asarray(record["objects"]).ravel():
            parts = [
                (_text(part["part_name"]), np.asarray(part["mask"]).astype(bool))
                for part in np.asarray(obj["parts"]).ravel()
            ]
            objects.append(PartObject(
                class_name=_text(obj["class"]),
                class_index=int(np.asarray(obj["class_ind"]).squeeze()),
                mask=np.asarray(obj["mask"]).astype(bool),
                parts=parts,
            ))
    except (IndexError, KeyError, ValueError, TypeError) as err:
        raise DataError(f"{path}: not a PASCAL-Part annotation (anno.objects.parts): {err}") from None
    return objects


def human_parts_target(objects: list[PartObject], shape: tuple[int, int], source: Path | str) -> np.ndarray:
    """The int64 H x W parts map (0 background, 1..6 parts, all 255 without person parts)."""
    target = np.zeros(shape, dtype=np.int64)
    for obj in objects:
        if obj.class_index != PERSON_CLASS:
            continue
        for name, mask in obj.parts:
            if name not in PART_GROUPS:
                raise DataError(f"{source}: unknown person part '{name}' (known: {', '.join(PART_GROUPS)})")
            if mask.shape != tuple(shape):
                raise DataError(f"{source}: part mask '{name}' is {mask.shape}, the image {tuple(shape)}")
            target[mask] = PART_GROUPS[name]
    if not target.any():
        target[:] = IGNORE_INDEX
    return target


def load_human_parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The parts map of image size ``shape`` from a ``human_parts/<name>.mat`` file."""
    return human_parts_target(read_part_objects(path), shape, path)
