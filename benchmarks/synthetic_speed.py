"""Rendering speed of the synthetic dataset on one CPU core: frames per second, still frames and clips.

Prints frames/s by wall clock and by process CPU time (the latter is what one core delivers when the
machine is shared) and writes them as JSON. The goal is >= 100 frames/s at 96 x 128.

    python benchmarks/synthetic_speed.py --out runs/bench/synthetic_speed.json [--height 96 --width 128]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from densemtl.config import SyntheticConfig
from densemtl.data.synthetic import render_clip, render_frame
from densemtl.jsonio import write_json


def measure(render: Callable[[int], int], count: int) -> dict[str, float]:
    """Frames/s of ``render(i)`` (returns the frames it made) over ``i = 0 .. count - 1``, after a warm-up."""
    render(count)
    frames, wall, cpu = 0, time.perf_counter(), time.process_time()
    for index in range(count):
        frames += render(index)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"frames": frames, "wall_s": wall, "cpu_s": cpu, "fps_wall": frames / wall, "fps_cpu": frames / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=300, help="still frames to render")
    parser.add_argument("--clips", type=int, default=4, help="clips of 16 frames to render")
    parser.add_argument("--out", default="runs/bench/synthetic_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = SyntheticConfig(height=args.height, width=args.width)
    results = {
        "height": args.height,
        "width": args.width,
        "still": measure(lambda i: bool(render_frame(config, "train", i)), args.frames),
        "clips": measure(lambda i: len(render_clip(config, i)), args.clips),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    for kind in ("still", "clips"):
        row = results[kind]
        print(f"{kind:6s} {args.height}x{args.width}: {row['frames']} frames, {row['fps_wall']:.1f} frames/s "
              f"(wall), {row['fps_cpu']:.1f} frames/s (CPU time of this process)")
    print(f"wrote {write_json(results, args.out)}")


if __name__ == "__main__":
    main()
