"""Reading coded batches back: every `coded_root` image is one flat colour, R = 40 * label + 20 and
G = 8 * (index % 30) + 8, so (R, G) of any crop names the sample it came from and its true label."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.contract import Placement, denormalize

CPU = Placement("cpu", torch.float32)  # where the tests' batches go: the CPU, in float32


def sample_ids(images: torch.Tensor) -> list[tuple[int, int]]:
    """(label, index within class) of each image of a normalised coded batch, read from its mean colour."""
    rgb = denormalize(images).mean(dim=(2, 3)).cpu().numpy()
    labels = np.rint((rgb[:, 0] - 20) / 40).astype(int)
    index = np.rint((rgb[:, 1] - 8) / 8).astype(int)
    return list(zip(labels.tolist(), index.tolist(), strict=True))


def epoch_ids(loader) -> list[list[tuple[int, int]]]:
    """Sample ids of every batch of one pass over `loader`."""
    return [sample_ids(images) for images, _ in loader]


def colour_error(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Largest distance of any pixel's R/B from the value the label says (JPEG and resizing leave a few levels)."""
    x = denormalize(images)
    r_expected = (40 * labels.float() + 20).view(-1, 1, 1).to(x.device)
    return max(float((x[:, 0] - r_expected).abs().max()), float((x[:, 2] - 128).abs().max()))
