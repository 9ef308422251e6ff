"""Tiny NYUD-v2 and PASCAL-Context folders written in exactly the on-disk layouts of the real releases.

The real datasets cannot be downloaded here, so tests write small fixtures and check the loaders, the
data checker and the evaluation of saved predictions against them. Every writer returns the targets a
correct loader must produce (the conventions of :mod:`densemtl.tasks`), so a test can compare exactly.

Layouts (as the README describes them):

* NYUD ``"NYUD_MT"`` (MTI-Net): ``images/*.jpg``, ``segmentation/*.png``, ``depth/*.npy`` (metres),
  ``normals/*.npy`` (float H x W x 3), ``edge/*.npy`` (float H x W), ``gt_sets/{train,val}.txt``.
* NYUD ``"NYUDv2"`` (ATRC / InvPT): the same with ``images/*.png``, ``normals/*.png`` (uint8,
  ``2v/255 - 1``, all-zero pixels invalid) and ``edge/*.png`` (uint8, ``/255``).
  Options: ``depth_format="png16"`` writes depth as 16-bit PNG in millimetres, ``semseg_bits=16`` writes
  the class map as a 16-bit PNG.
* PASCAL-Context: ``JPEGImages/*.jpg``, ``ImageSets/Context/{train,val}.txt``,
  ``semseg/pascal-context/*.png`` (0..20, 255 ignore), ``human_parts/*.mat`` (PASCAL-Part ``anno``
  struct), ``normals_distill/*.png`` (uint8), ``sal_distill/*.png`` (uint8 grey),
  ``pascal-context/trainval/*.mat`` (``LabelMap`` of the 459 PASCAL-Context classes).

The same frame content is written by both NYUD layouts (:func:`nyud_frame` is deterministic from the
seed and the name), normals are pre-quantised to the PNG encoding and edges are 0/1, so the two layouts
must load to identical targets; only the JPEG image differs from the PNG one (lossy, quality 100).

Typical use::

    expected = write_nyud(tmp_path / "nyud", layout="NYUDv2", splits={"train": 2, "val": 1})
    expected["val"]["val_000"]["semseg"]   # int64 H x W, 255 = ignore

``expected[split][name]`` holds ``image`` (uint8 H x W x 3 as written) and one array per task:
``semseg`` / ``human_parts`` int64 H x W, ``depth`` float32 H x W, ``normals`` float32 3 x H x W,
``edge`` / ``saliency`` float32 H x W. PASCAL's ``edge`` is computed by the loader from the LabelMap
(Laplacian then thinning), so it is not given (None); its LabelMap is, as ``labelmap``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

NYUD_LAYOUTS = ("NYUD_MT", "NYUDv2")

# PASCAL-Context LabelMap ids used by the fixtures (ids of the 459-class list): whether the field's
# loaders keep the distilled normals on them (classes shared with NYUD, plus tvmonitor).
CONTEXT_WALL, CONTEXT_FLOOR, CONTEXT_PERSON, CONTEXT_TVMONITOR = 440, 158, 284, 427
CONTEXT_SKY, CONTEXT_AEROPLANE = 360, 2
NORMALS_VALID_CONTEXT = (CONTEXT_WALL, CONTEXT_FLOOR, CONTEXT_PERSON, CONTEXT_TVMONITOR)

PERSON_PARTS = {  # PASCAL-Part name -> 6-class id (background 0), as the field groups them
    "head": 1, "hair": 1, "leye": 1, "mouth": 1,
    "torso": 2, "neck": 2,
    "luarm": 3, "ruarm": 3,
    "llarm": 4, "rhand": 4,
    "ruleg": 5, "luleg": 5,
    "rlleg": 6, "lfoot": 6,
}


def _split_names(splits: dict[str, int]) -> dict[str, list[str]]:
    return {split: [f"{split}_{i:03d}" for i in range(count)] for split, count in splits.items()}


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, *name.encode()])


def _blocky_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth-ish RGB picture (JPEG keeps it close to the PNG version)."""
    small = rng.integers(0, 256, size=(max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def _quantised_normals(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """3 x H x W normals already on the uint8 PNG grid (``2v/255 - 1``), some pixels invalid (zero)."""
    vectors = rng.normal(size=(height, width, 3)) + np.array([0.0, 0.0, 2.0])
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    encoded = np.clip(np.rint((vectors + 1) * 127.5), 1, 255).astype(np.uint8)
    encoded[rng.random((height, width)) < 0.1] = 0
    return decode_png_normals(encoded)


def decode_png_normals(encoded: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x H x W float32 with ``2v/255 - 1``; all-zero pixels become the zero vector."""
    normals = encoded.astype(np.float32).transpose(2, 0, 1) * np.float32(2.0 / 255.0) - np.float32(1.0)
    normals[:, encoded.sum(axis=2) == 0] = 0.0
    return normals


def encode_png_normals(normals: np.ndarray) -> np.ndarray:
    """Inverse of :func:`decode_png_normals` for normals on the grid (zero vectors -> 0)."""
    encoded = np.clip(np.rint((normals.transpose(1, 2, 0) + 1) * 127.5), 0, 255).astype(np.uint8)
    encoded[np.abs(normals).sum(axis=0) == 0] = 0
    return encoded


def nyud_frame(name: str, height: int = 24, width: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """One NYUD frame: the file contents (``semseg_file`` 0..40) and the targets a loader must return."""
    rng = _rng(seed, name)
    semseg_file = rng.integers(0, 41, size=(height, width)).astype(np.uint8)
    semseg_file[0, 0], semseg_file[0, 1], semseg_file[0, 2] = 0, 1, 40  # void, first and last class
    millimetres = rng.integers(500, 9500, size=(height, width))
    millimetres[rng.random((height, width)) < 0.1] = 0
    depth = millimetres.astype(np.float32) / 1000.0  # on the millimetre grid: a 16-bit PNG holds it exactly
    edge = (rng.random((height, width)) < 0.2).astype(np.float32)
    semseg = np.where(semseg_file == 0, 255, semseg_file.astype(np.int64) - 1)
    return {
        "image": _blocky_image(rng, height, width),
        "semseg_file": semseg_file,
        "semseg": semseg.astype(np.int64),
        "depth": depth,
        "normals": _quantised_normals(rng, height, width),
        "edge": edge,
    }


def write_nyud_frame(
    root: Path, layout: str, name: str, frame: dict[str, np.ndarray], depth_format: str = "npy",
    semseg_bits: int = 8,
) -> None:
    """Write one frame's files in ``layout`` (``"NYUD_MT"`` or ``"NYUDv2"``)."""
    if layout not in NYUD_LAYOUTS:
        raise ValueError(f"unknown NYUD layout {layout!r} (known: {', '.join(NYUD_LAYOUTS)})")
    root = Path(root)
    for folder in ("images", "segmentation", "depth", "normals", "edge"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    if layout == "NYUD_MT":
        Image.fromarray(frame["image"]).save(root / "images" / f"{name}.jpg", quality=100, subsampling=0)
        np.save(root / "normals" / f"{name}.npy", frame["normals"].transpose(1, 2, 0).astype(np.float32))
        np.save(root / "edge" / f"{name}.npy", frame["edge"].astype(np.float32))
    else:
        Image.fromarray(frame["image"]).save(root / "images" / f"{name}.png")
        Image.fromarray(encode_png_normals(frame["normals"])).save(root / "normals" / f"{name}.png")
        Image.fromarray((frame["edge"] * 255).astype(np.uint8)).save(root / "edge" / f"{name}.png")
    dtype = np.uint16 if semseg_bits == 16 else np.uint8
    Image.fromarray(frame["semseg_file"].astype(dtype)).save(root / "segmentation" / f"{name}.png")
    if depth_format == "png16":
        millimetres = np.rint(frame["depth"] * 1000).astype(np.uint16)
        Image.fromarray(millimetres).save(root / "depth" / f"{name}.png")
    else:
        np.save(root / "depth" / f"{name}.npy", frame["depth"])


def write_nyud(
    root: Path, layout: str = "NYUD_MT", splits: dict[str, int] | None = None, height: int = 24,
    width: int = 32, seed: int = 0, depth_format: str = "npy", semseg_bits: int = 8,
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """A NYUD folder in ``layout`` with ``splits`` (default train 3, val 2); returns ``expected[split][name]``."""
    root = Path(root)
    names = _split_names(splits or {"train": 3, "val": 2})
    (root / "gt_sets").mkdir(parents=True, exist_ok=True)
    expected: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for split, split_names in names.items():
        (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{name}\n" for name in split_names))
        expected[split] = {}
        for name in split_names:
            frame = nyud_frame(name, height, width, seed)
            write_nyud_frame(root, layout, name, frame, depth_format=depth_format, semseg_bits=semseg_bits)
            expected[split][name] = frame
    return expected


def write_part_mat(path: Path, imname: str, objects: list[dict]) -> None:
    """A PASCAL-Part annotation with the real files' struct layout.

    ``objects``: ``{"class": "person", "class_ind": 15, "mask": uint8 H x W, "parts": [(name, mask), ...]}``;
    an object without parts gets the empty 0 x 0 ``parts`` array, as in the real files.
    """
    part_dtype = [("part_name", "O"), ("mask", "O")]
    object_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    struct_objects = np.zeros((1, len(objects)), dtype=object_dtype)
    for index, obj in enumerate(objects):
        parts = obj.get("parts", [])
        struct_parts = np.zeros((1, len(parts)) if parts else (0, 0), dtype=part_dtype)
        for part_index, (part_name, mask) in enumerate(parts):
            struct_parts[0, part_index] = (np.array([part_name]), np.asarray(mask, dtype=np.uint8))
        struct_objects[0, index] = (
            np.array([obj["class"]]),
            np.array([[obj["class_ind"]]], dtype=np.uint8),
            np.asarray(obj["mask"], dtype=np.uint8),
            struct_parts,
        )
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (np.array([imname]), struct_objects)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"anno": anno})


def write_labelmap_mat(path: Path, labelmap: np.ndarray) -> None:
    """A PASCAL-Context ``trainval/*.mat`` holding ``LabelMap`` (uint16 ids of the 459 classes)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"LabelMap": np.asarray(labelmap, dtype=np.uint16)})


def _person_objects(height: int, width: int, with_parts: bool) -> tuple[list[dict], np.ndarray]:
    """One person (left half) with parts in stripes, one dog (right half): objects and expected parts."""
    person = np.zeros((height, width), dtype=np.uint8)
    person[:, : width // 2] = 1
    dog = np.zeros((height, width), dtype=np.uint8)
    dog[:, width // 2 :] = 1
    parts, target = [], np.zeros((height, width), dtype=np.int64)
    names = list(PERSON_PARTS)
    rows = np.array_split(np.arange(height), len(names))
    for part_name, band in zip(names, rows, strict=True):
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[band, : width // 2] = 1
        parts.append((part_name, mask))
        target[mask.astype(bool)] = PERSON_PARTS[part_name]
    objects = [
        {"class": "person", "class_ind": 15, "mask": person, "parts": parts if with_parts else []},
        {"class": "dog", "class_ind": 12, "mask": dog, "parts": [("head", dog)]},
    ]
    if not with_parts:
        target[:] = 255
    return objects, target


def pascal_frame(name: str, height: int = 24, width: int = 32, seed: int = 0, with_parts: bool = True) -> dict:
    """One PASCAL-Context frame: file contents and the targets a loader must return (edge: None)."""
    rng = _rng(seed, name)
    semseg = rng.integers(0, 21, size=(height, width)).astype(np.int64)
    semseg[0, 0] = 255
    labelmap = np.full((height, width), CONTEXT_WALL, dtype=np.uint16)
    labelmap[height // 2 :, :] = CONTEXT_FLOOR
    labelmap[: height // 3, width // 2 :] = CONTEXT_SKY
    labelmap[height // 3 : height // 2, width // 2 :] = CONTEXT_AEROPLANE
    encoded = encode_png_normals(_quantised_normals(rng, height, width))
    valid = np.isin(labelmap, NORMALS_VALID_CONTEXT)
    normals = decode_png_normals(encoded) * valid[None]
    saliency_file = rng.integers(0, 256, size=(height, width)).astype(np.uint8)
    saliency_file[0, :2] = (127, 128)  # the 0.5 threshold: 127/255 -> 0, 128/255 -> 1
    objects, parts = _person_objects(height, width, with_parts)
    return {
        "image": _blocky_image(rng, height, width),
        "semseg": semseg,
        "labelmap": labelmap,
        "normals_file": encoded,
        "normals": normals.astype(np.float32),
        "saliency_file": saliency_file,
        "saliency": (saliency_file > 127).astype(np.float32),
        "part_objects": objects,
        "human_parts": parts,
        "edge": None,
    }


def write_pascal(
    root: Path, splits: dict[str, int] | None = None, height: int = 24, width: int = 32, seed: int = 0,
    without_parts: tuple[str, ...] = ("val_001",),
) -> dict[str, dict[str, dict]]:
    """A PASCAL-Context folder (default train 3, val 2); names in ``without_parts`` have no person parts."""
    root = Path(root)
    names = _split_names(splits or {"train": 3, "val": 2})
    folders = ("JPEGImages", "ImageSets/Context", "semseg/pascal-context", "human_parts", "normals_distill",
               "sal_distill", "pascal-context/trainval")
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    expected: dict[str, dict[str, dict]] = {}
    for split, split_names in names.items():
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("".join(f"{n}\n" for n in split_names))
        expected[split] = {}
        for name in split_names:
            frame = pascal_frame(name, height, width, seed, with_parts=name not in without_parts)
            Image.fromarray(frame["image"]).save(root / "JPEGImages" / f"{name}.jpg", quality=100, subsampling=0)
            Image.fromarray(frame["semseg"].astype(np.uint8)).save(root / "semseg" / "pascal-context" / f"{name}.png")
            write_part_mat(root / "human_parts" / f"{name}.mat", name, frame["part_objects"])
            Image.fromarray(frame["normals_file"]).save(root / "normals_distill" / f"{name}.png")
            Image.fromarray(frame["saliency_file"]).save(root / "sal_distill" / f"{name}.png")
            write_labelmap_mat(root / "pascal-context" / "trainval" / f"{name}.mat", frame["labelmap"])
            expected[split][name] = frame
    return expected
