"""PASCAL-Context loader on fixtures, and the human-parts mapping on real PASCAL-Part annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.ndimage
import torch
from PIL import Image
from skimage.morphology import thin

from densemtl.config import DataConfig, load_config
from densemtl.data import build_dataset
from densemtl.data.pascal import NORMALS_VALID_CONTEXT_IDS, VOC_CLASS_NAMES, PascalContextDataset, label_boundaries
from densemtl.data.pascal_parts import PART_CLASS_NAMES, load_human_parts, read_part_objects
from densemtl.errors import DataError
from densemtl.metrics.edge_protocols import seism_boundaries
from tests.dataset_fixtures import NORMALS_VALID_CONTEXT, write_part_mat, write_pascal

TASKS = ["semseg", "human_parts", "normals", "saliency", "edge"]
REAL_PARTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pascal-part-examples"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _dataset(root: Path, split: str = "val", tasks: list[str] | None = None, **kwargs) -> PascalContextDataset:
    config = DataConfig(dataset="pascal", root=str(root), tasks=tasks or TASKS, **kwargs)
    return PascalContextDataset(config, split, False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pascal")
    return root, write_pascal(root)


def test_targets_match_the_files(folder: tuple[Path, dict]) -> None:
    root, expected = folder
    dataset = _dataset(root)
    assert len(dataset) == 2
    for index in range(len(dataset)):
        raw = dataset.load_raw(index)
        frame = expected["val"][raw["meta"]["name"]]
        for task in ("semseg", "human_parts", "normals"):
            np.testing.assert_array_equal(raw[task], frame[task], err_msg=task)
        np.testing.assert_array_equal(raw["saliency"][0], frame["saliency"])
        assert np.abs(raw["image"].astype(int) - frame["image"]).max() <= 6  # JPEG quality 100
        sample = dataset[index]
        assert sample["semseg"].dtype == torch.int64 and sample["human_parts"].dtype == torch.int64
        assert sample["edge"].shape == (1, 24, 32) and sample["meta"]["size"] == (24, 32)


def test_saliency_binarised_at_half(folder: tuple[Path, dict]) -> None:
    root, expected = folder
    raw = _dataset(root).load_raw(0)
    assert expected["val"][raw["meta"]["name"]]["saliency_file"][0, :2].tolist() == [127, 128]
    assert raw["saliency"][0, 0, :2].tolist() == [0.0, 1.0]


def test_normals_only_on_nyud_classes(folder: tuple[Path, dict]) -> None:
    root, expected = folder
    raw = _dataset(root).load_raw(0)
    labelmap = expected["val"][raw["meta"]["name"]]["labelmap"]
    assert set(NORMALS_VALID_CONTEXT) <= NORMALS_VALID_CONTEXT_IDS
    assert not {360, 2} & NORMALS_VALID_CONTEXT_IDS  # sky and aeroplane: no NYUD counterpart
    invalid = ~np.isin(labelmap, list(NORMALS_VALID_CONTEXT_IDS))
    assert invalid.any() and (raw["normals"][:, invalid] == 0).all()
    valid_nonzero = np.abs(raw["normals"][:, ~invalid]).sum(0) > 0
    assert valid_nonzero.mean() > 0.8  # the rest of the fixture's zero pixels are PNG-invalid ones


def test_edges_are_thinned_labelmap_laplacian(folder: tuple[Path, dict]) -> None:
    root, expected = folder
    raw = PascalContextDataset(DataConfig(dataset="pascal", root=str(root), tasks=TASKS), "val", True).load_raw(1)
    labelmap = expected["val"][raw["meta"]["name"]]["labelmap"].astype(np.float64)
    # the same definition through scipy: 4-neighbour Laplacian with mirrored (OpenCV default) borders
    reference = thin(scipy.ndimage.laplace(labelmap, mode="mirror") != 0).astype(np.float32)
    np.testing.assert_array_equal(raw["edge"][0], reference)
    # boundaries lie next to label changes and are one pixel wide on a straight border
    changes = np.zeros(labelmap.shape, bool)
    changes[:, :-1] |= labelmap[:, :-1] != labelmap[:, 1:]
    changes[:, 1:] |= labelmap[:, :-1] != labelmap[:, 1:]
    changes[:-1] |= labelmap[:-1] != labelmap[1:]
    changes[1:] |= labelmap[:-1] != labelmap[1:]
    edge = raw["edge"][0] > 0
    assert edge.any() and not (edge & ~changes).any()
    assert edge[:, 0].sum() == 1  # the floor/wall border (horizontal, left column) is one pixel thick
    assert label_boundaries(np.full((5, 6), 7)).sum() == 0


def test_evaluation_scores_edges_against_seism_ground_truth(folder: tuple[Path, dict]) -> None:
    root, expected = folder
    raw = _dataset(root).load_raw(1)  # an evaluation dataset
    labelmap = expected["val"][raw["meta"]["name"]]["labelmap"]
    np.testing.assert_array_equal(raw["edge"][0], seism_boundaries(labelmap))
    assert not np.array_equal(raw["edge"][0], label_boundaries(labelmap))  # not the training target


def test_image_without_person_parts_is_all_ignore(folder: tuple[Path, dict]) -> None:
    root, expected = folder
    dataset = _dataset(root, tasks=["human_parts"])
    parts = {dataset.names[i]: dataset[i]["human_parts"] for i in range(len(dataset))}
    assert (parts["val_001"] == 255).all()  # the fixture's person has no part annotation here
    with_parts = parts["val_000"]
    assert set(with_parts.unique().tolist()) == set(range(7))
    assert (with_parts[:, 16:] == 0).all()  # the dog (and its 'head' part) stays background


def test_voc12_segmentation_takes_precedence(tmp_path: Path) -> None:
    write_pascal(tmp_path, splits={"val": 1})
    (tmp_path / "semseg" / "VOC12").mkdir()
    Image.fromarray(np.full((24, 32), 7, np.uint8)).save(tmp_path / "semseg" / "VOC12" / "val_000.png")
    assert (_dataset(tmp_path, tasks=["semseg"])[0]["semseg"] == 7).all()


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    write_pascal(tmp_path, splits={"val": 2})
    Image.fromarray(np.full((24, 32), 30, np.uint8)).save(tmp_path / "semseg" / "pascal-context" / "val_000.png")
    with pytest.raises(DataError, match=r"val_000\.png: label values \[30\]"):
        _dataset(tmp_path, tasks=["semseg"])[0]
    (tmp_path / "pascal-context" / "trainval" / "val_001.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(DataError, match=r"trainval/val_001\.mat"):
        _dataset(tmp_path, tasks=["edge"])[1]
    scipy.io.savemat(str(tmp_path / "human_parts" / "val_001.mat"), {"something": np.zeros(3)})
    with pytest.raises(DataError, match=r"human_parts/val_001\.mat.*anno"):
        _dataset(tmp_path, tasks=["human_parts"])[1]
    skipping = _dataset(tmp_path, tasks=["human_parts"], on_bad_sample="skip")
    assert skipping[1]["meta"]["name"] == "val_000" and skipping.skipped == 1


def test_info_and_config(folder: tuple[Path, dict]) -> None:
    root, _ = folder
    info = _dataset(root).info
    assert info.num_classes == {"semseg": 21, "human_parts": 7}
    assert info.class_names["semseg"] == VOC_CLASS_NAMES and info.class_names["semseg"][15] == "person"
    assert info.class_names["human_parts"] == PART_CLASS_NAMES and info.boundary_max_dist == 0.0075
    config = load_config(CONFIGS / "pascal_multitask.yaml", [f"data.root={root}"])
    assert config.data.crop_size == [512, 512] and config.data.tasks == ["semseg", "human_parts", "saliency",
                                                                         "normals", "edge"]
    assert config.loss.weights == {"semseg": 1.0, "human_parts": 2.0, "saliency": 5.0, "normals": 10.0,
                                   "edge": 50.0}
    sample = build_dataset(config.data, "train", train=True)[0]
    assert sample["image"].shape == (3, 512, 512) and sample["human_parts"].shape == (512, 512)


# --- real PASCAL-Part annotations -------------------------------------------------------------------------

def _expected_part_class(part_name: str) -> int:
    """The 6-class grouping written as rules on the PASCAL-Part names (independent of the loader's table)."""
    if part_name in ("head", "hair", "nose", "mouth") or part_name[1:] in ("eye", "ear", "ebrow"):
        return 1
    if part_name in ("torso", "neck"):
        return 2
    if part_name.endswith("uarm"):
        return 3
    if part_name.endswith(("larm", "hand")):
        return 4
    if part_name.endswith("uleg"):
        return 5
    if part_name.endswith(("lleg", "foot")):
        return 6
    raise AssertionError(f"unexpected person part {part_name}")


needs_real = pytest.mark.skipif(not REAL_PARTS.is_dir(), reason=f"{REAL_PARTS} not present")


@needs_real
def test_real_human_parts_mapping() -> None:
    files = sorted(REAL_PARTS.glob("*.mat"))
    assert len(files) == 18
    persons = images_with_persons = other_object_pixels = 0
    for path in files:
        with Image.open(path.with_suffix(".jpg")) as image:
            shape = (image.height, image.width)
        objects = read_part_objects(path)
        target = load_human_parts(path, shape)
        assert target.shape == shape
        person_parts = [(name, mask) for obj in objects if obj.class_index == 15 for name, mask in obj.parts]
        persons += sum(obj.class_index == 15 for obj in objects)
        if not person_parts:
            assert (target == 255).all(), path.name
            continue
        images_with_persons += 1
        coverage = np.zeros(shape, np.int64)
        for _, mask in person_parts:
            coverage += mask
        for name, mask in person_parts:  # pixels owned by exactly one person part carry its class
            own = mask & (coverage == 1)
            assert (target[own] == _expected_part_class(name)).all(), (path.name, name)
        assert (target[coverage == 0] == 0).all(), path.name  # everything else, other objects included
        for obj in objects:
            if obj.class_index != 15:
                other_object_pixels += int((obj.mask & (coverage == 0)).sum())
        assert set(np.unique(target)) <= set(range(7))
    # 19 person instances, as the folder's README states; they are in 8 of the images (the README says 10)
    assert (persons, images_with_persons) == (19, 8)
    assert other_object_pixels > 0  # non-person objects were really present next to people


@needs_real
def test_real_files_through_the_dataset(tmp_path: Path) -> None:
    names = sorted(path.stem for path in REAL_PARTS.glob("*.mat"))
    for folder in ("JPEGImages", "human_parts", "ImageSets/Context"):
        (tmp_path / folder).mkdir(parents=True)
    for name in names:  # links, not copies: the real files stay where they are
        (tmp_path / "JPEGImages" / f"{name}.jpg").symlink_to(REAL_PARTS / f"{name}.jpg")
        (tmp_path / "human_parts" / f"{name}.mat").symlink_to(REAL_PARTS / f"{name}.mat")
    (tmp_path / "ImageSets" / "Context" / "val.txt").write_text("\n".join(names) + "\n")
    dataset = _dataset(tmp_path, tasks=["human_parts"])
    ignored = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["human_parts"].shape == sample["image"].shape[1:]
        ignored += bool((sample["human_parts"] == 255).all())
    assert ignored == 10  # the 10 images without a person


@needs_real
def test_fixture_mat_has_the_real_struct_layout(tmp_path: Path) -> None:
    mask = np.ones((4, 5), np.uint8)
    write_part_mat(tmp_path / "x.mat", "x", [{"class": "person", "class_ind": 15, "mask": mask,
                                              "parts": [("head", mask)]},
                                             {"class": "chair", "class_ind": 9, "mask": mask}])
    fixture = scipy.io.loadmat(str(tmp_path / "x.mat"))["anno"]
    real = scipy.io.loadmat(str(REAL_PARTS / "2009_001103.mat"))["anno"]  # has a person and a part-less object
    assert fixture.shape == real.shape and fixture.dtype.names == real.dtype.names
    fixture_objects, real_objects = fixture[0, 0]["objects"], real[0, 0]["objects"]
    assert fixture_objects.dtype.names == real_objects.dtype.names and fixture_objects.ndim == real_objects.ndim
    for field in ("class", "class_ind", "mask"):
        assert fixture_objects[0, 0][field].dtype == real_objects[0, 0][field].dtype, field
    assert fixture_objects[0, 0]["parts"].dtype.names == real_objects[0, 0]["parts"].dtype.names
    assert fixture_objects[0, 1]["parts"].shape == real_objects[0, 2]["parts"].shape == (0, 0)
