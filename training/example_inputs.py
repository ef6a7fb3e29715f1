"""Write the example input images the ready workflows use (img2img, inpaint, ControlNet) to inputs/examples/.

``python -m training.example_inputs``; rendered by the same code as the training data, so the
files can be remade byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from . import shapes
from .architecture import REPO_ROOT

EXAMPLES_DIR = REPO_ROOT / "inputs" / "examples"

_CIRCLE = shapes.Sample(shapes.Combo("red", "circle", "blue"), (16.0, 16.0, 48.0, 48.0), None)
_TRIANGLE = shapes.Sample(shapes.Combo("white", "triangle", "black"), (14.0, 12.0, 50.0, 48.0), None)
# The square the inpainting example repaints: the circle and a margin around it.
_INPAINT_BOX = (12, 12, 52, 52)


def write_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """Render the examples; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    circle = shapes.render(_CIRCLE)
    alpha = np.full(circle.shape[:2], 255, dtype=np.uint8)
    x0, y0, x1, y1 = _INPAINT_BOX
    alpha[y0:y1, x0:x1] = 0  # transparent = the region LoadImage's mask marks for repainting
    silhouette = np.rint(shapes.silhouette(_TRIANGLE) * 255).astype(np.uint8)
    files = {
        "red-circle-on-blue.png": Image.fromarray(circle, "RGB"),
        "inpaint-red-circle-on-blue.png": Image.fromarray(np.dstack([circle, alpha]), "RGBA"),
        "silhouette-triangle.png": Image.fromarray(np.dstack([silhouette] * 3), "RGB"),
    }
    written = []
    for name, image in files.items():
        path = folder / name
        image.save(path, optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_examples():
        print(path.relative_to(REPO_ROOT))
