"""Dataset folders on disk: file readers and the base class shared by NYUD-v2 and PASCAL-Context.

Every reader raises :class:`~densemtl.errors.DataError` naming the file, so a corrupt or missing file
never surfaces as a bare decoder exception deep inside a DataLoader worker. :class:`FolderDataset`
holds what both benchmarks share: split files of sample names, per-sample file lookup (several
candidate paths per source, tried in order), the joint transforms, and the bad-sample policy
(``data.on_bad_sample``: ``"error"`` raises, ``"skip"`` replaces the sample by the next readable one and
counts it in a log message). A dataset declared partial (``data.partial_labels``) keeps a sample that lacks
a task's file: that task's label is missing for it (:mod:`densemtl.data.base`); its image stays required.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.io
from PIL import Image

from densemtl.config import DataConfig
from densemtl.data.base import DenseDataset
from densemtl.data.transforms import build_transform
from densemtl.errors import DataError

log = logging.getLogger(__name__)

# What decoders raise on damaged files (PIL: OSError/SyntaxError, numpy: ValueError/EOFError,
# scipy.io: IndexError/TypeError/KeyError/MatReadError, MATLAB v7.3 files: NotImplementedError).
_DECODE_ERRORS = (
    OSError, ValueError, EOFError, IndexError, TypeError, KeyError, SyntaxError, NotImplementedError,
    scipy.io.matlab.MatReadError,
)


def read_image_file(path: Path) -> np.ndarray:
    """A picture file decoded completely (a truncated file fails here, not later): uint8/uint16 array."""
    try:
        with Image.open(path) as image:
            image.load()
            return np.array(image)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def read_rgb(path: Path) -> np.ndarray:
    """An RGB photo as uint8 H x W x 3 (grey or palette images are converted)."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array (no pickles)."""
    try:
        return np.load(path, allow_pickle=False)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot read array ({err})") from None


def read_mat(path: Path, key: str) -> np.ndarray:
    """Variable ``key`` of a MATLAB ``.mat`` file (v5 format, as the datasets ship them)."""
    try:
        content = scipy.io.loadmat(str(path), variable_names=[key])
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot read MATLAB file ({err})") from None
    if key not in content:
        raise DataError(f"{path}: MATLAB file has no variable '{key}'")
    return content[key]


def read_split(path: Path) -> list[str]:
    """Sample names of a split file, one per line (blank lines ignored)."""
    if not path.is_file():
        siblings = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        known = f" (split files there: {', '.join(siblings)})" if siblings else ""
        raise DataError(f"{path}: split file not found{known}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: split file lists no samples")
    return names


def missing_message(candidates: list[Path]) -> str:
    """``"<first candidate>: missing"``, naming the other file names that were tried too."""
    others = f" (nor {', '.join(path.name for path in candidates[1:])})" if len(candidates) > 1 else ""
    return f"{candidates[0]}: missing{others}"


def as_label_map(array: np.ndarray, path: Path) -> np.ndarray:
    """A single-channel integer map as int64, or a DataError naming the file."""
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: expected a single-channel integer label map, got {array.dtype} {array.shape}")
    return array.astype(np.int64)


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """Every value is a class id ``0..num_classes-1`` or the ignore label 255."""
    bad = (labels >= num_classes) & (labels != 255)
    if bad.any():
        values = np.unique(labels[bad])[:5].tolist()
        raise DataError(f"{path}: label values {values} outside 0..{num_classes - 1} and 255")


class FolderDataset(DenseDataset):
    """A benchmark folder: one sample per name of a split file, files found by candidate paths.

    Subclasses describe the folder (``markers``, ``split_file``, ``sources``) and decode one target
    (``read_target``); all are class methods so ``densemtl data check`` can use them without a config.
    """

    markers: ClassVar[tuple[str, ...]]  # sub-folders (relative paths) of which one identifies the dataset
    task_sources: ClassVar[dict[str, str]] = {}  # task -> source key, where the task's file is another
    # task -> its evaluation target from (training target, per-sample cache), where the two differ
    evaluation_targets: ClassVar[dict[str, Callable[[np.ndarray, dict[str, Any]], np.ndarray]]] = {}

    def __init__(self, data_config: DataConfig, split: str, train: bool) -> None:
        if not data_config.root:
            raise DataError(f"dataset '{self.dataset_name}' needs data.root, the folder holding it")
        self.root = Path(data_config.root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder not found (data.root)")
        self.tasks = self.check_tasks(data_config.tasks)
        self.split = split
        self.on_bad_sample = data_config.on_bad_sample
        # the sources each task is read from (a task's label is missing when one of them is)
        self.needs = {task: set(self.sources(self.root, [task])) - {"image"} for task in self.tasks}
        optional = set().union(*self.needs.values()) if data_config.partial_labels else set()
        names = read_split(self.split_file(self.root, split))
        files, missing = self.index(self.root, names, self.tasks, optional)
        self._log_partial(split, [entry for entry in missing if entry[0] in optional])
        missing = [entry for entry in missing if entry[0] not in optional]
        if missing:
            first = missing_message(missing[0][1])
            if self.on_bad_sample == "error":
                raise DataError(
                    f"{first} ({len(missing)} files missing in split '{split}'; "
                    f"list them with `densemtl data check {self.root}`)"
                )
            log.warning("%s: %d files missing in split '%s' (first: %s); those samples are skipped",
                        self.root, len(missing), split, first)
        self.names = [name for name in names if name in files]
        if not self.names:
            raise DataError(f"{self.split_file(self.root, split)}: no sample of split '{split}' has all its files")
        self.files = [files[name] for name in self.names]
        self.train = train
        self.transform = build_transform(data_config, train=train)
        self.info = self.dataset_info(self.tasks)
        self.skipped = 0

    def _log_partial(self, split: str, absent: list[tuple[str, list[Path]]]) -> None:
        if absent:
            counts = {source: sum(1 for entry in absent if entry[0] == source) for source in dict(absent)}
            listing = ", ".join(f"{source} {count}" for source, count in counts.items())
            log.info("%s: split '%s' is partially labelled (files missing: %s)", self.root, split, listing)

    @classmethod
    def detect(cls, root: Path) -> bool:
        """Whether ``root`` holds one of the :attr:`markers` folders."""
        return any((Path(root) / marker).is_dir() for marker in cls.markers)

    @classmethod
    def describe_layout(cls, root: Path) -> str:
        """Text added to the dataset's title in ``data check`` reports (e.g. which layout was found)."""
        return ""

    @classmethod
    def split_file(cls, root: Path, split: str) -> Path:
        raise NotImplementedError

    @classmethod
    def sources(cls, root: Path, tasks: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Per source (``"image"``, a task, or a shared file), candidate paths with ``{name}``, in order."""
        raise NotImplementedError

    @classmethod
    def read_target(
        cls, task: str, files: dict[str, Path], size: tuple[int, int], cache: dict[str, Any]
    ) -> np.ndarray:
        """Decode one task's target (tasks.py conventions); ``cache`` shares files read by several tasks."""
        raise NotImplementedError

    @classmethod
    def locate(
        cls, root: Path, name: str, sources: dict[str, tuple[str, ...]]
    ) -> tuple[dict[str, Path], list[tuple[str, list[Path]]]]:
        """Sample ``name``'s file per source (first existing candidate) and ``(source, candidates)`` missing."""
        files: dict[str, Path] = {}
        missing: list[tuple[str, list[Path]]] = []
        for source, candidates in sources.items():
            paths = [root / candidate.format(name=name) for candidate in candidates]
            path = next((p for p in paths if p.is_file()), None)
            if path is None:
                missing.append((source, paths))
            else:
                files[source] = path
        return files, missing

    @classmethod
    def index(
        cls, root: Path, names: list[str], tasks: Iterable[str], optional: Iterable[str] = ()
    ) -> tuple[dict[str, dict[str, Path]], list[tuple[str, list[Path]]]]:
        """The files of every name that has all of them but ``optional`` sources, and ``(source, candidates)``
        of each one missing."""
        sources = cls.sources(root, tasks)
        optional = set(optional)
        found: dict[str, dict[str, Path]] = {}
        missing: list[tuple[str, list[Path]]] = []
        for name in names:
            files, lacking = cls.locate(root, name, sources)
            missing += lacking
            if all(source in optional for source, _ in lacking):
                found[name] = files
        return found, missing

    @classmethod
    def read_task(
        cls, task: str, files: dict[str, Path], size: tuple[int, int], cache: dict[str, Any]
    ) -> np.ndarray:
        """:meth:`read_target`, checked to have the image's height and width ``size`` and no NaN or infinity
        (which would reach the loss as a divergence instead of naming the file)."""
        target = cls.read_target(task, files, size, cache)
        path = files[cls.task_sources.get(task, task)]
        if tuple(target.shape[-2:]) != tuple(size):
            raise DataError(
                f"{path}: {task} target is {target.shape[-2]}x{target.shape[-1]}, "
                f"the image {files['image'].name} is {size[0]}x{size[1]}"
            )
        if np.issubdtype(target.dtype, np.floating) and not np.isfinite(target).all():
            count = int((~np.isfinite(target)).sum())
            raise DataError(f"{path}: {task} target holds NaN or infinite values ({count} of {target.size})")
        return target

    def load_raw(self, index: int) -> dict[str, Any]:
        """Sample ``index`` decoded but not transformed (the raw format of :mod:`densemtl.data.transforms`);
        an evaluation dataset (``train=False``) holds the evaluation targets."""
        files = self.files[index]
        image = read_rgb(files["image"])
        cache: dict[str, Any] = {}
        raw: dict[str, Any] = {"image": image}
        for task in self.tasks:
            if not self.needs[task] <= files.keys():
                raw[task] = None  # partial labels: this sample lacks the task's file
                continue
            raw[task] = self.read_task(task, files, image.shape[:2], cache)
            if not self.train and task in self.evaluation_targets:
                raw[task] = self.evaluation_targets[task](raw[task], cache)
        raw["meta"] = {"name": self.names[index]}
        return raw

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self.names) <= index < len(self.names):
            raise IndexError(f"sample {index} out of range for {len(self.names)} samples")
        for attempt in range(len(self.names)):
            current = (index + attempt) % len(self.names)
            try:
                return self.transform(self.load_raw(current), current)
            except DataError as err:
                if self.on_bad_sample == "error":
                    raise
                self.skipped += 1
                log.warning("skipped sample '%s' (%s); %d skipped so far in this process",
                            self.names[current], err, self.skipped)
        raise DataError(f"{self.root}: no readable sample left in split '{self.split}'")
