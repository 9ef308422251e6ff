"""``densemtl data check ROOT``: validate a NYUD-v2 or PASCAL-Context folder before a long run.

Detects the dataset and layout, counts the samples of every split and the files of every task, opens
every file (``quick``: an evenly spaced sample per split) with the training loaders, and checks what
would otherwise fail or silently skew a run: unreadable files, targets whose size differs from the
image, label values out of range, normals that are not unit length, implausible depth, edge values
outside [0, 1], names listed twice or in two splits. Prints a summary table, then one line per
problem naming the file; returns the problems (the CLI exits 1 when there are any).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from densemtl.data.files import FolderDataset, missing_message, read_rgb, read_split
from densemtl.data.nyud import NYUDDataset, detect_layout
from densemtl.data.pascal import PascalContextDataset
from densemtl.errors import DataError

DATASETS: dict[str, type[FolderDataset]] = {"nyud": NYUDDataset, "pascal": PascalContextDataset}
QUICK_SAMPLES = 20  # per split with --quick
NORMALS_TOLERANCE = 0.1  # allowed | |n| - 1 | (8-bit PNG quantisation stays under 0.01)
NORMALS_BAD_FRACTION = 0.01  # share of valid pixels allowed off unit length
MAX_DEPTH_METRES = 100.0


def detect_dataset(root: Path) -> str | None:
    """``"nyud"`` (``gt_sets/``), ``"pascal"`` (``ImageSets/Context`` or ``JPEGImages/``), else None."""
    if (root / "gt_sets").is_dir():
        return "nyud"
    if (root / "ImageSets" / "Context").is_dir() or (root / "JPEGImages").is_dir():
        return "pascal"
    return None


def target_problems(task: str, target: np.ndarray, path: Path) -> list[str]:
    """Value checks beyond what the loaders enforce, one message per problem."""
    problems = []
    if task == "normals":
        norm = np.linalg.norm(target, axis=0)
        valid = norm > 0
        off = np.abs(norm[valid] - 1) > NORMALS_TOLERANCE
        if valid.any() and off.mean() > NORMALS_BAD_FRACTION:
            problems.append(
                f"{path}: {100 * off.mean():.1f}% of valid normals are not unit length "
                f"(median |n| = {np.median(norm[valid]):.3f})"
            )
    elif task == "depth":
        valid = target > 0
        if not valid.any():
            problems.append(f"{path}: no valid depth pixel")
        elif target.max() > MAX_DEPTH_METRES:
            problems.append(f"{path}: depth up to {target.max():.1f} m, expected metres (millimetres stored?)")
    elif task == "edge" and ((target < 0) | (target > 1)).any():
        problems.append(f"{path}: edge values outside [0, 1] (min {target.min():.3g}, max {target.max():.3g})")
    return problems


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
        problems += target_problems(task, target, files[cls.task_sources.get(task, task)])
    return problems


def _check_split(
    cls: type[FolderDataset], root: Path, split: str, names: list[str], quick: bool
) -> tuple[dict[str, int], list[str]]:
    """File counts per source (plus ``opened``) and the problems of one split."""
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
        if folder.is_dir():
            problems.append(missing_message(candidates))
        elif folder not in absent_folders:
            absent_folders.add(folder)
            problems.append(f"{folder}: folder missing ({missing_count[source]} files of split '{split}')")
    sampled = [name for name in _sample(names, quick) if "image" in located[name][0]]
    for name in tqdm(sampled, desc=f"checking {split}", unit="sample", leave=False):
        problems += _open_sample(cls, located[name][0], tasks)
    counts["opened"] = len(sampled)
    return counts, problems


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width)
                               in enumerate(zip(row, widths, strict=True))) for row in rows)


def check_dataset(root: Path, dataset: str | None = None, quick: bool = False) -> list[str]:
    """Check the dataset folder ``root``; print a summary table and the problems; return the problems."""
    root = Path(root).expanduser()
    if not root.is_dir():
        problems = [f"{root}: folder not found"]
        print(problems[0])
        return problems
    dataset = dataset or detect_dataset(root)
    if dataset is None:
        problems = [f"{root}: neither NYUD-v2 (gt_sets/) nor PASCAL-Context (ImageSets/Context/, JPEGImages/)"]
        print(problems[0])
        return problems
    cls = DATASETS[dataset]
    problems: list[str] = []
    title = f"{'NYUD-v2' if dataset == 'nyud' else 'PASCAL-Context'} at {root}"
    try:
        if dataset == "nyud":
            title += f" (layout {detect_layout(root)})"
        split_dir = cls.split_file(root, "train").parent
        splits = sorted(path.stem for path in split_dir.glob("*.txt"))
        if not splits:
            raise DataError(f"{split_dir}: no split files (*.txt)")
    except DataError as err:
        print(title)
        print(err)
        return [str(err)]
    sources = list(cls.sources(root, cls.supported_tasks))
    rows = [["split", "samples", *sources, "opened"]]
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
        counts, split_problems = _check_split(cls, root, split, names, quick)
        problems += split_problems
        rows.append([split, str(len(set(names))), *(str(counts[s]) for s in sources), str(counts["opened"])])
    problems = list(dict.fromkeys(problems))  # a file listed in two splits is reported once
    print(title)
    print(_table(rows))
    print(f"{len(problems)} problem(s)" + (" (quick: a sample of each split opened)" if quick else ""))
    for problem in problems:
        print(problem)
    return problems
