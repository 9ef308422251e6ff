"""The embedded synthetic dataset: procedurally generated rooms rendered by vectorised ray casting.

Each frame is a rectangular room (floor, four walls, ceiling) furnished with boxes, vertical cylinders and
spheres grouped into furniture (tables, chairs, cabinets, sofas, lamps...), textured procedurally and lit by
a point light plus ambient light (Lambertian, no shadows). All pixels' rays are intersected with all
primitives at once in numpy, so a 96 x 128 frame takes a few milliseconds, and labels are exact:

- ``semseg``: the class of the visible primitive (:data:`CLASS_NAMES`);
- ``depth``: z-depth in metres (the distance along the optical axis; rooms give about 0.5-10 m);
- ``normals``: unit normals in the camera frame, x to the right, y up, z towards the viewer (a surface
  facing the camera is (0, 0, 1); the floor seen from a level camera is (0, 1, 0));
- ``edge``: one-pixel-thin boundaries where the class or the object instance changes, or where the depth
  jumps between primitives (occlusions); the pixel nearer to the camera is marked;
- ``saliency``: the furniture (every object class except pictures on the walls).

Frames are deterministic functions of ``(seed, split, index)``. Video clips move the camera smoothly through
one scene. Splits are rendered once and cached as compressed ``.npz``.

Modules: ``geometry`` (primitives and their ray hits, the camera), ``scene`` (rooms, furniture, camera
paths), ``render`` (ray caster, shading, labels), ``dataset`` (frames by split, the cache, the datasets).
The names below are the package's public interface.
"""

from densemtl.data.synthetic.dataset import (
    GENERATOR_VERSION,
    SPLITS,
    SYNTHETIC_TASKS,
    SyntheticClips,
    SyntheticDataset,
    cache_dir,
    cache_path,
    load_split,
    render_clip,
    render_frame,
    split_size,
    synthetic_info,
)
from densemtl.data.synthetic.render import DEPTH_JUMP, FOCAL_AT_640, boundaries, render
from densemtl.data.synthetic.scene import CLASS_NAMES, SALIENT_CLASSES, sample_scene

__all__ = [
    "CLASS_NAMES", "DEPTH_JUMP", "FOCAL_AT_640", "GENERATOR_VERSION", "SALIENT_CLASSES", "SPLITS", "SYNTHETIC_TASKS",
    "SyntheticClips", "SyntheticDataset", "boundaries", "cache_dir", "cache_path", "load_split", "render",
    "render_clip", "render_frame", "sample_scene", "split_size", "synthetic_info",
]
