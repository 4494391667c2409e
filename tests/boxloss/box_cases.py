"""Random matched box pairs that cover the geometric cases every IoU-family test needs.

Coordinates are multiples of 1/8 so the special cases are exact in float32: identical boxes,
touching edges (x1 of one box == x2 of the other), containment, disjoint boxes and a general mix.
"""

import torch

KINDS = ("general", "disjoint", "contained", "identical", "touching")


def random_boxes(n: int, generator: torch.Generator, lo: float = 1.0, hi: float = 40.0) -> torch.Tensor:
    xy = torch.randint(0, 8 * 100, (n, 2), generator=generator) / 8.0
    wh = torch.randint(int(8 * lo), int(8 * hi), (n, 2), generator=generator) / 8.0
    return torch.cat([xy, xy + wh], dim=1)


def box_pairs(n: int, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` matched pairs ``(pred, target)``, a fifth of each kind in :data:`KINDS` (non-degenerate)."""
    g = torch.Generator().manual_seed(seed)
    k = n // len(KINDS)
    sizes = [k] * (len(KINDS) - 1) + [n - k * (len(KINDS) - 1)]
    preds, targets = [], []
    for kind, m in zip(KINDS, sizes):
        p = random_boxes(m, g)
        w, h = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
        if kind == "general":
            t = random_boxes(m, g)
        elif kind == "disjoint":  # shifted right by more than the width
            gap = torch.randint(1, 80, (m,), generator=g) / 8.0
            t = p + torch.stack([w + gap, gap * 0, w + gap, gap * 0], 1)
            t[:, 3] = t[:, 1] + torch.randint(8, 320, (m,), generator=g) / 8.0
        elif kind == "contained":  # target strictly inside the prediction
            fx = torch.randint(1, 4, (m,), generator=g) / 8.0
            t = torch.stack([p[:, 0] + fx * w, p[:, 1] + fx * h, p[:, 2] - fx * w, p[:, 3] - fx * h], 1)
        elif kind == "identical":
            t = p.clone()
        else:  # touching: target starts where the prediction ends, overlapping vertically
            tw = torch.randint(8, 320, (m,), generator=g) / 8.0
            t = torch.stack([p[:, 2], p[:, 1] + h / 2, p[:, 2] + tw, p[:, 3] + h / 2], 1)
        preds.append(p)
        targets.append(t)
    return torch.cat(preds).to(dtype), torch.cat(targets).to(dtype)


def degenerate_pairs(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs with zero width or height, inverted sides (x2 < x1) and identical zero-size boxes."""
    pred = torch.tensor(
        [
            [0.0, 0.0, 0.0, 5.0],  # zero width
            [0.0, 0.0, 5.0, 0.0],  # zero height
            [3.0, 3.0, 3.0, 3.0],  # point, identical to its target
            [5.0, 0.0, 1.0, 4.0],  # inverted x
            [0.0, 5.0, 4.0, 1.0],  # inverted y
            [0.0, 0.0, 0.0, 0.0],  # point vs normal box
            [1.0, 1.0, 4.0, 4.0],  # normal vs zero-size target
        ],
        dtype=dtype,
    )
    target = torch.tensor(
        [
            [0.0, 0.0, 2.0, 5.0],
            [1.0, 1.0, 3.0, 3.0],
            [3.0, 3.0, 3.0, 3.0],
            [0.0, 0.0, 4.0, 4.0],
            [0.0, 0.0, 4.0, 4.0],
            [1.0, 1.0, 2.0, 2.0],
            [2.0, 2.0, 2.0, 2.0],
        ],
        dtype=dtype,
    )
    return pred, target


def value_and_grads(fn, pred, target):
    """``fn(pred, target)`` and its gradients with respect to both (of the summed loss)."""
    p = pred.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_()
    loss = fn(p, t)
    gp, gt = torch.autograd.grad(loss.sum(), (p, t))
    return loss.detach(), gp, gt


def numerical_grad(f, x, h=1e-6):
    """Central differences of f(x).sum() in every coordinate of x."""
    grad = torch.zeros_like(x)
    flat = x.detach().clone().view(-1)
    for i in range(flat.numel()):
        orig = flat[i].item()
        flat[i] = orig + h
        up = f(flat.view_as(x)).sum()
        flat[i] = orig - h
        down = f(flat.view_as(x)).sum()
        flat[i] = orig
        grad.view(-1)[i] = (up - down) / (2 * h)
    return grad
