"""``densemtl data check ROOT``: validate a dataset folder (NYUD-v2, PASCAL-Context...) before a long run.

Detects the dataset (the first :class:`FolderDataset` of the DATASETS table whose marker folders
``root`` holds) and its layout, counts the samples of every split and the files of every task, opens
every file (``quick``: an evenly spaced sample per split) with the training loaders, and checks what
would otherwise fail or silently skew a run: unreadable files, targets whose size differs from the
image, NaN or infinite target values, label values out of range, values their task finds implausible
(:meth:`Task.target_problems`: normals off unit length, depth in millimetres, edges outside [0, 1]),
names listed twice or in two splits. Prints a summary table, then one line per problem naming the file;
returns the problems (the CLI exits 1 when there are any). For a dataset declared partial (``partial``,
``data.partial_labels`` in a run) a missing task file is no problem: the report gives each task's coverage
per split instead (the share of samples that have all the files of that task's label); a missing image
still is one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from densemtl.data.files import FolderDataset, missing_message, read_rgb, read_split
from densemtl.errors import DataError, UserError
from densemtl.registry import DATASETS, TASKS

QUICK_SAMPLES = 20  # per split with --quick


def folder_datasets() -> dict[str, type[FolderDataset]]:
    """The rows of DATASETS read from a folder, by name (importing each dataset's module)."""
    return {name: cls for name, cls in DATASETS.items() if issubclass(cls, FolderDataset)}


def detect_dataset(root: Path) -> str | None:
    """The first folder dataset whose marker folders ``root`` holds, else None."""
    return next((name for name, cls in folder_datasets().items() if cls.detect(root)), None)


def _dataset_class(root: Path, dataset: str | None) -> type[FolderDataset]:
    """The class of ``dataset`` (detected when None); a DataError when ``root`` is no dataset folder."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    checkable = folder_datasets()
    dataset = dataset or detect_dataset(root)
    if dataset is None:
        known = " nor ".join(f"{cls.title} ({', '.join(f'{marker}/' for marker in cls.markers)})"
                             for cls in checkable.values())
        raise DataError(f"{root}: neither {known}")
    if dataset not in checkable:
        DATASETS.check(dataset)
        raise UserError(f"dataset '{dataset}' is not read from a folder; data check knows {', '.join(checkable)}")
    return checkable[dataset]


def _sample(names: list[str], quick: bool) -> list[str]:
    if not quick or len(names) <= QUICK_SAMPLES:
        return names
    return [names[int(i)] for i in np.linspace(0, len(names) - 1, QUICK_SAMPLES)]


def _open_sample(cls: type[FolderDataset], files: dict[str, Path], tasks: tuple[str, ...]) -> list[str]:
    """Open one sample's files; every unreadable or inconsistent file is one problem."""
    try:
        image = read_rgb(files["image"])
    except DataError as err:
        return [str(err)]
    problems: list[str] = []
    cache: dict = {}
    for task in tasks:
        if cls.task_sources.get(task, task) not in files:
            continue
        try:
            target = cls.read_task(task, files, image.shape[:2], cache)
        except DataError as err:
            if str(err) not in problems:
                problems.append(str(err))
            continue
        problems += TASKS[task].target_problems(target, files[cls.task_sources.get(task, task)])
    return problems


def _coverage(cls: type[FolderDataset], root: Path, located: dict, split: str) -> str:
    """``coverage <split>: <task> <percent> (<labelled>/<samples>) ...``: who has all of a task's files."""
    parts = []
    for task in cls.supported_tasks:
        needs = set(cls.sources(root, [task])) - {"image"}
        labelled = sum(1 for files, _ in located.values() if needs <= files.keys())
        parts.append(f"{task} {100 * labelled / max(len(located), 1):.1f}% ({labelled}/{len(located)})")
    return f"coverage {split}: " + ", ".join(parts)


def _check_split(
    cls: type[FolderDataset], root: Path, split: str, names: list[str], quick: bool, partial: bool = False
) -> tuple[dict[str, int], list[str], str]:
    """File counts per source (plus ``opened``), the problems and the task coverage line of one split."""
    tasks = cls.supported_tasks
    problems = [f"{cls.split_file(root, split)}: '{name}' listed {count} times"
                for name, count in Counter(names).items() if count > 1]
    names = list(dict.fromkeys(names))
    sources = cls.sources(root, tasks)
    located = {name: cls.locate(root, name, sources) for name in names}
    missing = [entry for _, lacking in located.values() for entry in lacking]
    missing_count = Counter(source for source, _ in missing)
    counts = {source: len(names) - missing_count[source] for source in sources}
    absent_folders: set[Path] = set()
    for source, candidates in missing:
        folder = candidates[0].parent
        if partial and source != "image":
            continue  # partial labels: reported as coverage
        if folder.is_dir():
            problems.append(missing_message(candidates))
        elif folder not in absent_folders:
            absent_folders.add(folder)
            problems.append(f"{folder}: folder missing ({missing_count[source]} files of split '{split}')")
    sampled = [name for name in _sample(names, quick) if "image" in located[name][0]]
    for name in tqdm(sampled, desc=f"checking {split}", unit="sample", leave=False):
        problems += _open_sample(cls, located[name][0], tasks)
    counts["opened"] = len(sampled)
    return counts, problems, _coverage(cls, root, located, split)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width)
                               in enumerate(zip(row, widths, strict=True))) for row in rows)


def _split_names(cls: type[FolderDataset], root: Path) -> list[str]:
    """The splits of the folder: the stems of the split files beside the train split's."""
    split_dir = cls.split_file(root, "train").parent
    splits = sorted(path.stem for path in split_dir.glob("*.txt"))
    if not splits:
        raise DataError(f"{split_dir}: no split files (*.txt)")
    return splits


def _check_splits(
    cls: type[FolderDataset], root: Path, splits: list[str], quick: bool, partial: bool = False
) -> tuple[list[list[str]], list[str], list[str]]:
    """The summary table's rows, the problems and the coverage lines of every split."""
    sources = list(cls.sources(root, cls.supported_tasks))
    rows = [["split", "samples", *sources, "opened"]]
    problems: list[str] = []
    coverage: list[str] = []
    seen: dict[str, str] = {}
    for split in splits:
        try:
            names = read_split(cls.split_file(root, split))
        except DataError as err:
            problems.append(str(err))
            continue
        for name in dict.fromkeys(names):
            if name in seen:
                problems.append(f"{cls.split_file(root, split)}: '{name}' is also in split '{seen[name]}'")
            seen.setdefault(name, split)
        counts, split_problems, split_coverage = _check_split(cls, root, split, names, quick, partial)
        problems += split_problems
        coverage.append(split_coverage)
        rows.append([split, str(len(set(names))), *(str(counts[s]) for s in sources), str(counts["opened"])])
    return rows, list(dict.fromkeys(problems)), coverage  # a file listed in two splits is reported once


def check_dataset(root: Path, dataset: str | None = None, quick: bool = False, partial: bool = False) -> list[str]:
    """Check the dataset folder ``root``; print a summary table and the problems; return the problems.

    ``dataset`` names a row of DATASETS (default: detected); one that is not read from a folder is a
    UserError. ``partial``: the dataset is declared partially labelled (see the module docstring).
    """
    root = Path(root).expanduser()
    try:
        cls = _dataset_class(root, dataset)
    except DataError as err:
        print(err)
        return [str(err)]
    title = f"{cls.title} at {root}"
    try:
        title += cls.describe_layout(root)
        splits = _split_names(cls, root)
    except DataError as err:
        print(title)
        print(err)
        return [str(err)]
    rows, problems, coverage = _check_splits(cls, root, splits, quick, partial)
    print(title)
    print(_table(rows))
    if partial:
        print("\n".join(coverage))
    print(f"{len(problems)} problem(s)" + (" (quick: a sample of each split opened)" if quick else ""))
    for problem in problems:
        print(problem)
    return problems
