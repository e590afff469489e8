"""The scene's upright frame as stored with a dataset: the `scene` object of
`preprocess_summary.json` and of the server's `/tasks/{id}/sparse` (docs/stage-protocol.md).

Pure numpy, so the server can compute it for older datasets whose summary lacks it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.orientation import upright_frame

FRAME = "+Y up, centred, first camera looking along -Z"
SCENE_KEYS = ("up", "centre", "scale", "matrix", "frame", "method")


def scene_object(
    rotations: np.ndarray, translations: np.ndarray, points: np.ndarray | None = None
) -> dict[str, Any]:
    """The `scene` object for registered cameras (world-to-camera rotations (N, 3, 3) and
    translations (N, 3), in frame order) and optionally the sparse points (M, 3): up and
    centre in COLMAP world coordinates, the scale and the 4×4 matrix (row-major) that map
    COLMAP world coordinates into the upright frame, and how up was found."""
    found = upright_frame(rotations, translations, points, target_radius=1.0)
    return {
        "up": [round(float(v), 6) for v in found.up],
        "centre": [round(float(v), 9) for v in found.centre],
        "radius": round(float(found.radius), 9),
        "scale": round(float(found.scale), 9),
        "matrix": [[round(float(v), 9) for v in row] for row in found.matrix],
        "frame": FRAME,
        "method": found.method,
    }


def valid_scene(value: Any) -> bool:
    """Whether `value` looks like a stored `scene` object (every key, a 4×4 finite matrix)."""
    if not isinstance(value, dict) or not all(key in value for key in SCENE_KEYS):
        return False
    try:
        matrix = np.asarray(value["matrix"], dtype=np.float64)
        up = np.asarray(value["up"], dtype=np.float64)
        centre = np.asarray(value["centre"], dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return (
        matrix.shape == (4, 4)
        and up.shape == centre.shape == (3,)
        and bool(np.isfinite(matrix).all() and np.isfinite(up).all() and np.isfinite(centre).all())
    )
