"""The synthetic image that traces the vision graphs and is the default validation input (no file needed)."""

from __future__ import annotations


def sample_image():
    """A structured synthetic image to trace the vision graph (any size the family accepts)."""
    import numpy as np
    from PIL import Image

    # 224×168: multiples of 28, within Qwen2-VL's pixel limits, so every image path sees it without resizing
    y, x = np.mgrid[0:168, 0:224]
    img = np.stack([x / 224 * 255, y / 168 * 255, (np.sin(x / 13) * 0.5 + 0.5) * 255], -1)
    img[40:100, 60:140] = [230, 40, 40]
    return Image.fromarray(img.astype(np.uint8))
