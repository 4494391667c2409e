"""``torch.library`` custom ops of the IoU-family loss kernels, for torch.compile, torch.export and fake tensors.

The kernels read raw pointers (the compiled CPU loops, Triton) or write into cached workspaces (the
eager kernel): a tracer cannot look inside them. ``boxloss::iou_family_forward`` and
``boxloss::iou_family_backward`` wrap them as opaque ops with

* a fake implementation (output shapes, dtypes and devices only), so that ``torch.compile``,
  ``torch.export`` and ``FakeTensorMode`` propagate shapes without running a kernel;
* an autograd registration: forward saves the gradient rows (6 numbers per pair, 4 when the
  target needs no gradient), backward runs the backward op, as :class:`boxloss._kernels.IoUFamilyLoss`.

:func:`boxloss._kernels.iou_family_loss` routes here only while compiling or on fake tensors: in
eager mode the autograd Function avoids the dispatcher's few microseconds per call. The backend
(``"auto"`` by default: the compiled loops on CPU, Triton on CUDA) is resolved when the op runs,
so a compiled graph takes the kernel of the device it runs on.
"""

from typing import Optional  # real annotations (no __future__ import): custom_op reads them as types

import torch
from torch import Tensor

from . import _kernels

__all__ = ["iou_family_loss"]


@torch.library.custom_op("boxloss::iou_family_forward", mutates_args=())
def iou_family_forward(pred: Tensor, target: Tensor, kind: str, eps: float, log: bool, paper: bool, gated: bool,
                       rows: int, chunk: Optional[int], backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """Loss ``[N]`` of the ``[..., 4]`` pairs and the saved gradient rows ``[rows, N]`` (rows 0, 4 or 6)."""
    resolved = _kernels.resolve_backend(backend, pred.device)
    loss, grad = _kernels._forward(kind, pred, target, eps, log, paper, gated, rows, chunk, resolved)
    if grad is None:
        grad = loss.new_empty((0, loss.shape[0]))
    # a custom op's outputs may not share memory: the eager kernel's pooled CPU buffers are views
    return loss.clone() if loss._base is not None else loss, grad.clone() if grad._base is not None else grad


@iou_family_forward.register_fake
def _(pred, target, kind, eps, log, paper, gated, rows, chunk, backend):
    n = pred.numel() // 4
    return pred.new_empty((n,)), pred.new_empty((rows, n))


@torch.library.custom_op("boxloss::iou_family_backward", mutates_args=())
def iou_family_backward(grad_out: Tensor, g: Tensor, need_target: bool, chunk: Optional[int],
                        backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """``[N, 4]`` gradients of pred and target (``[0, 4]`` without ``need_target``) from the saved rows."""
    resolved = _kernels.resolve_backend(backend, g.device)
    gp, gt = _kernels._backward_any(grad_out, g, need_target, chunk, resolved)
    if gt is None:
        gt = gp.new_empty((0, 4))
    return gp, gt


@iou_family_backward.register_fake
def _(grad_out, g, need_target, chunk, backend):
    n = g.shape[1]
    return g.new_empty((n, 4)), g.new_empty((n if need_target else 0, 4))


def _setup_context(ctx, inputs, output):
    pred, target, kind, eps, log, paper, gated, rows, chunk, backend = inputs
    ctx.save_for_backward(output[1])
    ctx.rows, ctx.chunk, ctx.backend, ctx.shape = rows, chunk, backend, pred.shape


def _backward(ctx, grad_loss, grad_rows):
    if ctx.rows == 0:
        return (None,) * 10
    (g,) = ctx.saved_tensors
    gp, gt = torch.ops.boxloss.iou_family_backward(grad_loss, g, ctx.rows == 6, ctx.chunk, ctx.backend)
    return (gp.view(ctx.shape), gt.view(ctx.shape) if ctx.rows == 6 else None) + (None,) * 8


iou_family_forward.register_autograd(_backward, setup_context=_setup_context)


def iou_family_loss(pred: Tensor, target: Tensor, kind: str, eps: float, log: bool, paper: bool, gated: bool,
                    rows: int, chunk: int | None, backend: str | None) -> Tensor:
    """Per-pair loss ``[...]`` through the custom op (arguments checked by the caller)."""
    loss, _ = torch.ops.boxloss.iou_family_forward(pred, target, kind, eps, log, paper, gated, rows, chunk, backend)
    return loss.view(pred.shape[:-1])
