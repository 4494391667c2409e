"""The device check of every public function that takes more than one tensor."""

from __future__ import annotations

from torch import Tensor


def check_device(name: str, tensor, ref_name: str, ref: Tensor) -> None:
    """ValueError unless ``tensor`` (when it is a tensor) is on ``ref``'s device.

    Checked where data enters: a CPU tensor in a CUDA computation is otherwise a device-mismatch
    error deep inside an op, a silent host-to-device copy on every call, or (for the compiled CPU
    loops, which read raw pointers) a device pointer handed to C. Reads no data (no sync).
    """
    if isinstance(tensor, Tensor) and tensor.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {tensor.device}")
