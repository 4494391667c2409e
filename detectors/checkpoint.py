"""Checkpoints: read with a clear error, check that they fit the model, write them crash-safe.

* :func:`read_checkpoint` opens a file with ``torch.load``; a missing, truncated or garbage file is a
  :class:`~detectors.errors.CheckpointError` naming it.
* :func:`load_weights` puts a state dict into a model and refuses one that does not fit it
  (missing, unexpected or mis-shaped keys), naming the source and the first keys; partial loading
  (fine-tuning with another ``num_classes``) is an explicit opt-in that warns with every key skipped.
* :func:`resumable_checkpoints` lists the checkpoints of a work dir, newest first, for ``--resume``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .errors import CheckpointError

__all__ = [
    "read_checkpoint",
    "check_training_checkpoint",
    "state_dict_of",
    "describe_problems",
    "load_weights",
    "resumable_checkpoints",
]

# What an mmengine training checkpoint holds (EMA runs add "ema_state_dict").
TRAINING_KEYS = ("meta", "state_dict", "message_hub", "optimizer")


def read_checkpoint(path: str, *, trusted: bool, map_location="cpu"):
    """``torch.load`` a local checkpoint; any failure to read it is a :class:`CheckpointError`.

    ``trusted=True`` unpickles arbitrary objects (needed for the project's own training checkpoints,
    which hold the optimizer and message-hub state); use it only for files you wrote yourself.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    except Exception as e:  # torch raises several types: UnpicklingError, RuntimeError, EOFError, ...
        if not trusted and "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"torch.load(weights_only=True) refuses {path!r}: it holds more than tensors (a full training "
                f"checkpoint?). Refused for safety; if you trust it, save its weights alone: "
                f"torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth')") from e
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
        raise CheckpointError(f"cannot read checkpoint {path!r}: {reason[0] if reason else type(e).__name__}") from e


def check_training_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a training checkpoint for ``--resume`` and check it holds what resuming needs."""
    checkpoint = read_checkpoint(path, trusted=True, map_location=map_location)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint {path!r} is not a training checkpoint (a {type(checkpoint).__name__})")
    missing = [k for k in TRAINING_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is not a training checkpoint: it has no {missing} entries")
    return checkpoint


def state_dict_of(checkpoint, source: str) -> dict:
    """The weights in a checkpoint: a plain state dict, or under ``"state_dict"`` / ``"model"``."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{source!r} holds no state dict (a mapping of names to tensors)")
    return dict(checkpoint)


def _strip_wrapper_prefix(state_dict: dict, own: Mapping) -> dict:
    """Drop a prefix every key shares (DDP's ``module.``, a wrapper's ``detector.``) when no key fits as is."""
    if state_dict and not any(k in own for k in state_dict):
        prefix = next(iter(state_dict)).split(".", 1)[0] + "."
        if all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def describe_problems(source: str, missing, unexpected, mismatched, *, limit: int = 4) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {missing[:limit]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {unexpected[:limit]}")
    if mismatched:
        shapes = [f"{k} {list(a)} vs model {list(b)}" for k, a, b in mismatched[:limit]]
        parts.append(f"{len(mismatched)} keys of another shape [{'; '.join(shapes)}]")
    return f"checkpoint {source!r} does not fit this model: " + ", ".join(parts)


def load_weights(model: nn.Module, state_dict: Mapping, source: str, *, allow_partial: bool = False,
                 hint: str = "pass allow_partial_weights=True") -> None:
    """Load ``state_dict`` into ``model``; raise :class:`CheckpointError` unless every key fits.

    "Fits" is what ``load_state_dict(strict=True)`` accepts (so e.g. ``FrozenBatchNorm2d`` may drop
    the batch counters of a ``BatchNorm2d`` checkpoint), with equal shapes. With
    ``allow_partial=True`` the tensors that fit are loaded and the others (missing, unexpected or
    of another shape, e.g. the class layers of another ``num_classes``) are skipped with a warning
    that lists them all. A prefix on every key (DDP's ``module.``) is dropped.
    """
    own = model.state_dict()
    state_dict = _strip_wrapper_prefix(dict(state_dict), own)
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    bad = {k for k, _, _ in mismatched}
    result = model.load_state_dict({k: v for k, v in state_dict.items() if k not in bad}, strict=False)
    missing = [k for k in result.missing_keys if k not in bad]
    unexpected = list(result.unexpected_keys)
    if not (missing or unexpected or mismatched):
        return
    if not allow_partial:
        raise CheckpointError(describe_problems(source, missing, unexpected, mismatched)
                              + f" (wrong model for this checkpoint? to load the tensors that fit on purpose, {hint})")
    warnings.warn("partial load, skipped what does not fit: "
                  + describe_problems(source, missing, unexpected, mismatched, limit=len(own) + len(state_dict)))


_NUMBERED = re.compile(r"^(epoch|iter)_(\d+)\.pth$")


def resumable_checkpoints(work_dir: str) -> list[str]:
    """The work dir's checkpoints, newest first: the one ``last_checkpoint`` names, then
    ``epoch_N.pth`` / ``iter_N.pth`` by decreasing N."""
    found = []
    if not os.path.isdir(work_dir):
        return found
    numbered = []
    for name in os.listdir(work_dir):
        m = _NUMBERED.match(name)
        if m:
            numbered.append((int(m.group(2)), os.path.join(work_dir, name)))
    marker = os.path.join(work_dir, "last_checkpoint")
    if os.path.isfile(marker):
        with open(marker) as f:
            named = f.read().strip()
        if named:
            found.append(named)
    for _, path in sorted(numbered, reverse=True):
        if all(os.path.abspath(path) != os.path.abspath(p) for p in found):
            found.append(path)
    return found
