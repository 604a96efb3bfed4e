"""What would stall the host on a GPU, recorded on the CPU: the code under test runs on the `meta` device (tensors
without data) and a dispatch mode watches every operation."""

from __future__ import annotations

import torch
import torch.utils._python_dispatch


class HostDeviceTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Records what would stall the host on a GPU: reads of device values (item, nonzero, ...) and copies from the
    host to the device. The "device" here is `meta`: tensors without data, so any read of a value fails anyway.
    torch.tensor(data, device=...) copies below the dispatcher, so the two factory functions are watched directly."""

    READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2"}

    def __init__(self) -> None:
        super().__init__()
        self.reads, self.copies = [], []
        self._factories = {}

    def __enter__(self):
        for name in ("tensor", "as_tensor"):
            real = self._factories[name] = getattr(torch, name)

            def watched(*args, _real=real, **kwargs):
                if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
                    self.copies.append(False)  # a blocking copy of host data
                return _real(*args, **kwargs)

            setattr(torch, name, watched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._factories.items():
            setattr(torch, name, real)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in self.READS and any(t.device.type == "meta" for t in tensors):
            self.reads.append(name)
        if name == "_to_copy" and tensors[0].device.type == "cpu" and str(kwargs.get("device")) == "meta":
            self.copies.append(bool(kwargs.get("non_blocking")))
        if name == "copy_" and args[0].device.type == "meta" and args[1].device.type == "cpu":
            self.copies.append(bool(args[2] if len(args) > 2 else kwargs.get("non_blocking")))
        if name == "scalar_tensor" and str(kwargs.get("device")) == "meta":
            # `t[i] = 5.0`: on the meta device the value is made there, on a GPU it is a blocking copy from the host
            # (the H200's sync check found one in adjust_sharpness's kernel)
            self.copies.append(False)
        return func(*args, **kwargs)
