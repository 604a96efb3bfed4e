"""The DALI backend's tuning knobs and their defaults per GPU kind.

Every default below is a setting NVIDIA published, not a measurement of this project; `scripts/gpu_check.sh` sweeps
the ones that matter (hw_decoder_load, threads, prefetch) and the README says which were measured where.

- Hopper (H100, H200; compute capability 9.x): NVIDIA's MLPerf Training v3.1 ResNet-50 submission for one DGX H100
  (mlcommons/training_results_v3.1, NVIDIA/benchmarks/resnet/implementations/mxnet/config_DGXH100.sh):
  DALI_HW_DECODER_LOAD 0.99, DALI_THREADS 6, DALI_PREFETCH_QUEUE 5, DALI_NVJPEG_MEMPADDING 256 (MiB, which their
  DALI pipeline passes as both nvJPEG's device and host memory padding).
- Any other GPU: DALI's own defaults (hw_decoder_load 0.65, device padding 16 MiB, host padding 8 MiB, prefetch 2)
  and --workers threads. For comparison, NVIDIA's DeepLearningExamples PyTorch ResNet-50 pipeline pads nvJPEG with
  211,025,920 bytes on the device and 140,544,512 on the host "to handle all images from full-sized ImageNet without
  additional reallocations" (PyTorch/Classification/ConvNets/image_classification/dali.py).
- The CPU (device_id=None, tests and CPU-only machines): decoding runs on DALI's threads, so they get every worker.

Preallocation hints (the hardware decoder's buffers, sized once): the largest stored image of a .beton, read from
its index; for image folders ImageNet's largest (5980 x 6430), the value NVIDIA's ResNet-50 pipelines use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIB = 1 << 20
IMAGENET_LARGEST = (5980, 6430)  # width, height: NVIDIA's preallocate_width_hint / preallocate_height_hint
DALI_DEFAULT = {"hw_decoder_load": 0.65, "device_padding_mb": 16, "host_padding_mb": 8, "prefetch": 2}
HOPPER_MLPERF = {"hw_decoder_load": 0.99, "threads": 6, "prefetch": 5, "padding_mb": 256}


@dataclass(frozen=True)
class DaliTuning:
    hw_decoder_load: float
    threads: int
    prefetch: int
    device_padding_mb: int
    host_padding_mb: int
    width_hint: int
    height_hint: int
    origin: str  # where the defaults came from, for describe() and the benchmark files

    def as_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "hw_decoder_load",
                "threads",
                "prefetch",
                "device_padding_mb",
                "host_padding_mb",
                "width_hint",
                "height_hint",
                "origin",
            )
        }


def gpu_kind(device: torch.device) -> str:
    """'hopper', 'gpu' (any other CUDA device) or 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major == 9 else "gpu"


def resolve_tuning(
    device: torch.device,
    workers: int,
    size_hint: tuple[int, int],
    *,
    hw_decoder_load: float | None = None,
    threads: int = 0,
    prefetch: int = 0,
    nvjpeg_padding_mb: int | None = None,
) -> DaliTuning:
    """The knobs a pipeline is built with: explicit values win; None/0 (and a negative hw_decoder_load or padding,
    the trainer's "auto") take the GPU kind's default. size_hint: (width, height) of the largest image."""
    if hw_decoder_load is not None and hw_decoder_load >= 0 and not 0 <= hw_decoder_load <= 1:
        raise ValueError(
            f"hw_decoder_load must be in [0, 1] (or negative for the GPU's default), got {hw_decoder_load}"
        )
    if threads < 0 or prefetch < 0:
        raise ValueError(f"dali threads and prefetch must be >= 0 (0: the GPU's default), got {threads}, {prefetch}")
    kind = gpu_kind(device)
    auto_load = hw_decoder_load is None or hw_decoder_load < 0
    auto_pad = nvjpeg_padding_mb is None or nvjpeg_padding_mb < 0
    if kind == "hopper":
        load = HOPPER_MLPERF["hw_decoder_load"] if auto_load else hw_decoder_load
        n = threads or HOPPER_MLPERF["threads"]
        depth = prefetch or HOPPER_MLPERF["prefetch"]
        dev_pad = host_pad = HOPPER_MLPERF["padding_mb"] if auto_pad else nvjpeg_padding_mb
        origin = "H100/H200: NVIDIA's MLPerf settings, not measured here"
    else:
        load = DALI_DEFAULT["hw_decoder_load"] if auto_load else hw_decoder_load
        n = threads or max(1, int(workers))
        depth = prefetch or DALI_DEFAULT["prefetch"]
        if auto_pad:
            dev_pad, host_pad = DALI_DEFAULT["device_padding_mb"], DALI_DEFAULT["host_padding_mb"]
        else:
            dev_pad = host_pad = nvjpeg_padding_mb
        origin = "CPU pipeline" if kind == "cpu" else "DALI's defaults"
    explicit = [
        name
        for name, given in (
            ("hw_decoder_load", not auto_load),
            ("threads", threads > 0),
            ("prefetch", prefetch > 0),
            ("padding", not auto_pad),
        )
        if given
    ]
    if explicit:
        origin += f"; set: {', '.join(explicit)}"
    return DaliTuning(
        float(load), int(n), int(depth), int(dev_pad), int(host_pad), int(size_hint[0]), int(size_hint[1]), origin
    )
