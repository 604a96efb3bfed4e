"""Per-sample augmentation policies: TrivialAugmentWide and AutoAugment's ImageNet policy, for a whole batch.

Every sample gets its own operation and magnitude (torchvision's draws, per sample), yet a batch costs one batched
call per distinct operation: the draws are made on the host from a CPU generator and grouped there into a
`PolicyStep` (sample indices sorted by operation, magnitudes in that order, and the (operation, start, stop)
segments). Its two small tensors reach the device with the rest of the batch's parameters in one non-blocking copy
(pipeline.contract.to_device), and the segments are plain Python: applying a step reads nothing back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.augment.mixing import keep_format, uniform
from pipeline.augment.ops import AUTO_AUGMENT_OPS, TRIVIAL_OPS, Op
from pipeline.contract import denormalize, normalize, to_device


@dataclass(frozen=True)
class PolicyStep:
    """One operation per sample, grouped by operation on the host. Identity samples are left out."""

    order: torch.Tensor  # (k,) int64 CPU: indices of the samples that get an operation, grouped by operation
    magnitudes: torch.Tensor  # (k,) float32 CPU: their magnitudes, in `order`
    segments: tuple[tuple[str, int, int], ...]  # (operation, start, stop) ranges of `order`

    @classmethod
    def group(cls, names: list[str], magnitudes: torch.Tensor) -> PolicyStep:
        order, segments = [], []
        for name in sorted(set(names) - {"Identity"}):
            members = [i for i, nm in enumerate(names) if nm == name]
            segments.append((name, len(order), len(order) + len(members)))
            order += members
        idx = torch.tensor(order, dtype=torch.int64)
        return cls(idx, magnitudes.float()[idx], tuple(segments))

    def host_tensors(self) -> list[torch.Tensor]:
        return [self.order, self.magnitudes]

    def apply(self, x: torch.Tensor, order: torch.Tensor, magnitudes: torch.Tensor, ops: dict[str, Op]) -> torch.Tensor:
        """Pixels x (B, 3, H, W) float32 with each sample's operation applied; `order`/`magnitudes` are this step's
        tensors on x's device."""
        out = x.clone()
        for name, start, stop in self.segments:
            idx = order[start:stop]
            out.index_copy_(0, idx, ops[name](x.index_select(0, idx), magnitudes[start:stop]))
        return out


def apply_steps(
    images: torch.Tensor, steps: list[PolicyStep], ops: dict[str, Op], on_device: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Normalised images with the steps applied in turn, same dtype and layout. `on_device`: the steps' host tensors
    already on the images' device (in host_tensors() order); moved here otherwise."""
    if on_device is None:
        on_device = to_device([t for s in steps for t in s.host_tensors()], images.device)
    x = denormalize(images)
    for k, step in enumerate(steps):
        x = step.apply(x, on_device[2 * k], on_device[2 * k + 1], ops)
    return keep_format(normalize(x, images.dtype), images)


# ---------------------------------------------------------------------------------------------------- TrivialAugment


def trivial_augment_space(bins: int) -> dict[str, tuple[torch.Tensor | None, bool]]:
    """name -> (magnitudes over `bins`, signed): torchvision's TrivialAugmentWide._AUGMENTATION_SPACE."""
    lin = torch.linspace
    return {
        "Identity": (None, False),
        "ShearX": (lin(0.0, 0.99, bins), True),
        "ShearY": (lin(0.0, 0.99, bins), True),
        "TranslateX": (lin(0.0, 32.0, bins), True),
        "TranslateY": (lin(0.0, 32.0, bins), True),
        "Rotate": (lin(0.0, 135.0, bins), True),
        "Brightness": (lin(0.0, 0.99, bins), True),
        "Color": (lin(0.0, 0.99, bins), True),
        "Contrast": (lin(0.0, 0.99, bins), True),
        "Sharpness": (lin(0.0, 0.99, bins), True),
        "Posterize": ((8 - (torch.arange(bins) / ((bins - 1) / 6))).round().int().float(), False),
        "Solarize": (lin(1.0, 0.0, bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


TRIVIAL_AUGMENT_OPS = tuple(trivial_augment_space(31))


def trivial_augment_params(
    n: int, *, num_magnitude_bins: int = 31, p: float = 1.0, generator: torch.Generator | None = None
) -> tuple[list[str], torch.Tensor]:
    """Per sample: an operation name (uniform over TRIVIAL_AUGMENT_OPS) and its magnitude (uniform bin, random sign
    for signed operations); with probability 1 - p a sample gets Identity."""
    space = trivial_augment_space(num_magnitude_bins)
    names = list(space)
    op = torch.randint(len(names), (n,), generator=generator)
    bins = torch.randint(num_magnitude_bins, (n,), generator=generator)
    sign = torch.where(torch.randint(2, (n,), generator=generator) == 1, -1.0, 1.0)
    keep = uniform(generator, n) < p
    chosen, mags = [], torch.zeros(n)
    for i in range(n):
        name = names[int(op[i])] if keep[i] else "Identity"
        values, signed = space[name]
        if values is not None:
            mags[i] = float(values[int(bins[i])]) * (float(sign[i]) if signed else 1.0)
        chosen.append(name)
    return chosen, mags


def trivial_augment_steps(
    n: int, *, num_magnitude_bins: int = 31, p: float = 1.0, generator: torch.Generator | None = None
) -> list[PolicyStep]:
    return [
        PolicyStep.group(*trivial_augment_params(n, num_magnitude_bins=num_magnitude_bins, p=p, generator=generator))
    ]


def trivial_augment(
    images: torch.Tensor, *, num_magnitude_bins: int = 31, p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """TrivialAugmentWide per sample on the batch's device: every sample gets one operation at one magnitude
    (torchvision's op set and magnitude ranges, nearest interpolation, black fill). Samples sharing an operation are
    processed together, so a batch costs at most 14 batched operations however large it is."""
    steps = trivial_augment_steps(images.shape[0], num_magnitude_bins=num_magnitude_bins, p=p, generator=generator)
    return apply_steps(images, steps, TRIVIAL_OPS)


# ---------------------------------------------------------------------------------------------------- AutoAugment

# torchvision's AutoAugment(AutoAugmentPolicy.IMAGENET): 25 sub-policies of two (operation, probability, magnitude
# bin) steps, from "AutoAugment: Learning Augmentation Strategies from Data" (the reference README's augmentation).
AUTO_AUGMENT_IMAGENET: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


def auto_augment_space(height: int, width: int, bins: int = 10) -> dict[str, tuple[torch.Tensor | None, bool]]:
    """name -> (magnitudes over bins, signed): torchvision's AutoAugment._augmentation_space. Solarize thresholds are
    on the 0..255 scale here, as in torchvision's AutoAugment."""
    lin = torch.linspace
    return {
        "ShearX": (lin(0.0, 0.3, bins), True),
        "ShearY": (lin(0.0, 0.3, bins), True),
        "TranslateX": (lin(0.0, 150.0 / 331.0 * width, bins), True),
        "TranslateY": (lin(0.0, 150.0 / 331.0 * height, bins), True),
        "Rotate": (lin(0.0, 30.0, bins), True),
        "Brightness": (lin(0.0, 0.9, bins), True),
        "Color": (lin(0.0, 0.9, bins), True),
        "Contrast": (lin(0.0, 0.9, bins), True),
        "Sharpness": (lin(0.0, 0.9, bins), True),
        "Posterize": ((8 - (torch.arange(bins) / ((bins - 1) / 4)).round().int()).float(), False),
        "Solarize": (lin(255.0, 0.0, bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
        "Invert": (None, False),
    }


def auto_augment_params(
    n: int, height: int, width: int, *, p: float = 1.0, generator: torch.Generator | None = None
) -> list[tuple[list[str], torch.Tensor]]:
    """For each of the two steps: (operation name per sample, magnitude per sample). As torchvision's
    AutoAugment.get_params, per sample: a uniform sub-policy, two uniform draws against the steps' probabilities,
    two signs (negative on 0). A step that does not fire, or a sample skipped with probability 1 - p, is "Identity"."""
    space = auto_augment_space(height, width)
    policy = torch.randint(len(AUTO_AUGMENT_IMAGENET), (n,), generator=generator)
    probs = torch.rand((n, 2), generator=generator)
    signs = torch.randint(2, (n, 2), generator=generator)
    keep = uniform(generator, n) < p
    steps = []
    for k in range(2):
        names, mags = [], torch.zeros(n)
        for i in range(n):
            name, prob, bin_ = AUTO_AUGMENT_IMAGENET[int(policy[i])][k]
            if not keep[i] or not float(probs[i, k]) <= prob:
                names.append("Identity")
                continue
            values, signed = space[name]
            if values is not None:
                mags[i] = float(values[bin_]) * (-1.0 if signed and int(signs[i, k]) == 0 else 1.0)
            names.append(name)
        steps.append((names, mags))
    return steps


def auto_augment_steps(
    n: int, height: int, width: int, *, p: float = 1.0, generator: torch.Generator | None = None
) -> list[PolicyStep]:
    return [
        PolicyStep.group(names, mags) for names, mags in auto_augment_params(n, height, width, p=p, generator=generator)
    ]


def auto_augment(images: torch.Tensor, *, p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """AutoAugment with the ImageNet policy per sample on the batch's device (nearest interpolation, black fill, as
    torchvision's defaults). Each of the two steps processes the samples sharing an operation together: at most 14
    batched operations per step. With probability 1 - p a sample passes unchanged."""
    H, W = images.shape[-2:]
    return apply_steps(images, auto_augment_steps(images.shape[0], H, W, p=p, generator=generator), AUTO_AUGMENT_OPS)


# name -> (how a batch's steps are drawn, the operations they name)
POLICIES = {
    "trivialaugment": (lambda n, h, w, g: trivial_augment_steps(n, generator=g), TRIVIAL_OPS),
    "autoaugment": (lambda n, h, w, g: auto_augment_steps(n, h, w, generator=g), AUTO_AUGMENT_OPS),
}
