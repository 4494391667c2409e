"""Recog losses under AMP, their host reads (each a GPU sync), and the CUDA paths.

Device mismatches (labels, centres, weights on another device than the embeddings) are tested on
fake CUDA tensors in tests/boxloss/test_fake_cuda.py.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from boxloss.recog import (
    ArcFace,
    center_loss,
    center_update,
    contrastive_loss,
    marginal_loss,
    minimum_margin_loss,
    npair_loss,
    range_loss,
    select_npair_classes,
    triplet_loss,
    tuplet_loss,
)
from boxloss.recog._common import _check_label_range

CUDA = [pytest.param("cuda", marks=[pytest.mark.cuda,
                                    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

# The losses whose distances or logits come from a matmul (a Gram matrix or f·f⁺ᵀ): the ones
# autocast would run in half precision. center_loss and triplet_margin_loss are elementwise.
MATMUL_LOSSES = {
    "contrastive": lambda x, y: contrastive_loss(x, y, margin=20.0),
    "triplet_batch_all": lambda x, y: triplet_loss(x, y, mining="batch_all", margin=5.0),
    "triplet_batch_hard": lambda x, y: triplet_loss(x, y, mining="batch_hard", squared=False, margin=5.0),
    "triplet_semi_hard": lambda x, y: triplet_loss(x, y, mining="semi_hard", margin=5.0),
    "tuplet": lambda x, y: tuplet_loss(x[:2], x[2:4], x[4:8].reshape(2, 2, -1)),
    "npair": lambda x, y: npair_loss(x[:4], x[4:]),
    "minimum_margin": lambda x, y: minimum_margin_loss(x, margin=400.0),
    "marginal": lambda x, y: marginal_loss(x, y),
    "range": lambda x, y: range_loss(x, y, margin=400.0),
}


def _embeddings(seed=0):
    # Far from the origin with small differences: ‖x‖² ≈ 100, d² ≈ 1, so the Gram matrix's
    # cancellation (‖x‖² + ‖y‖² − 2xᵀy) turns bfloat16's 3 significant digits into errors of order d².
    g = torch.Generator().manual_seed(seed)
    return 10.0 / 16**0.5 + 0.3 * torch.randn(8, 16, generator=g)


@pytest.mark.parametrize("name", list(MATMUL_LOSSES))
def test_autocast_keeps_matmuls_in_float32(name):
    fn = MATMUL_LOSSES[name]
    x = _embeddings().requires_grad_()
    ref = fn(x, LABELS)
    (ref_grad,) = torch.autograd.grad(ref, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(x, LABELS)
    (grad,) = torch.autograd.grad(out, x)
    assert out.dtype == torch.float32
    # float32 everywhere: the same values to float32 rounding (with a bfloat16 Gram matrix the
    # contrastive loss is off by 2e-3 relative)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_autocast_leaves_npair_class_selection_in_float32():
    x = _embeddings(1)
    labels = torch.arange(8) // 2
    expected = select_npair_classes(x, labels, 3, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = select_npair_classes(x, labels, 3, generator=torch.Generator().manual_seed(0))
    assert got.tolist() == expected.tolist()


class _HostReads(TorchDispatchMode):
    """Counts the reads of tensor data by the host, each a device synchronisation on CUDA.

    Scalar reads (``item``, ``int()``, ``bool()``: ``aten._local_scalar_dense``), the ops whose
    output size depends on the data (``nonzero``, ``bincount``, ``unique``, ``masked_select``),
    and ``Tensor.tolist`` (which reads CPU memory without a dispatch, so it is wrapped).
    """

    READS = {"_local_scalar_dense", "nonzero", "bincount", "_unique2", "unique_dim", "unique_consecutive",
             "masked_select"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops = []
        tolist = torch.Tensor.tolist

        def counted(t):
            self.ops.append("tolist")
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.READS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_label_range_check_reads_the_device_once(monkeypatch):
    labels = torch.tensor([3, 0, 2, 2])
    with _HostReads(monkeypatch) as reads:
        _check_label_range(labels, 4)
    assert reads.ops == ["tolist"]  # min and max in one transfer, not one int() each
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] \(num_classes=3\), got 3"):
        _check_label_range(labels, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\] \(num_classes=4\), got -1"):
        _check_label_range(torch.tensor([1, -1]), 4)


def test_center_losses_read_the_device_only_for_the_label_check(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, centers = torch.randn(8, 3, generator=g), torch.randn(3, 3, generator=g)
    head = ArcFace(3, 3)
    with _HostReads(monkeypatch) as reads:
        center_loss(x, LABELS, centers)
        center_update(centers, x, LABELS)  # class counts by index_add_, not bincount
        head(x, LABELS)
    assert reads.ops == ["tolist"] * 3


def test_center_update_counts_match_bincount():
    # n_j from index_add_ against bincount's: Δc_j = Σ_{y_i = j}(c_j − x_i) / (1 + n_j), class 3 absent
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    centers = torch.randn(4, 3, generator=g, dtype=torch.float64)
    n = torch.bincount(LABELS, minlength=4).to(torch.float64)
    diff = torch.stack([(centers[j] - x[LABELS == j]).sum(0) for j in range(4)])
    expected = centers - 0.5 * diff / (1 + n)[:, None]
    torch.testing.assert_close(center_update(centers, x, LABELS, alpha=0.5), expected)


@pytest.mark.parametrize("device", CUDA)
def test_npair_class_selection_with_a_generator_of_the_device(device):
    x = _embeddings(3).to(device)
    labels = (torch.arange(8) // 2).to(device)
    got = select_npair_classes(x, labels, 3, generator=torch.Generator(device=device).manual_seed(0))
    assert got.device == x.device and got.shape == (3,) and got.unique().numel() == 3


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("name", list(MATMUL_LOSSES))
def test_cuda_values_and_float16_autocast_match_cpu(name, device):
    fn = MATMUL_LOSSES[name]
    x, xd, yd = _embeddings(), _embeddings().to(device), LABELS.to(device)
    ref = fn(x, LABELS)
    torch.testing.assert_close(fn(xd, yd).cpu(), ref, rtol=1e-5, atol=1e-5)
    with torch.autocast(device, dtype=torch.float16):
        out = fn(xd, yd)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
