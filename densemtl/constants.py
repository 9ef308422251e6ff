"""Values every layer agrees on: the ignore label and the input normalisation."""

from __future__ import annotations

IGNORE_INDEX = 255  # label maps, edge and saliency targets: pixels that no loss or metric counts
IMAGE_MEAN = (0.485, 0.456, 0.406)  # RGB in [0, 1], the ImageNet statistics every backbone expects
IMAGE_STD = (0.229, 0.224, 0.225)
