"""Host-device synchronisations of DIoU-NMS on the path GPUs take, counted without a GPU.

On CUDA every host read of a device value stalls the pipeline: ``.item()``, ``bool()``/``int()``/
``float()`` of a tensor, ``.tolist()``, ``.cpu()``/``.numpy()``, and the ops whose output size depends
on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave``
without ``output_size``). The torch path runs here on CPU tensors with the device formulation forced
(``_masked_path``), under a ``TorchDispatchMode`` that counts those ops and with the Python-level
reads (``tolist``, ``cpu``, ``numpy``) wrapped. The device part of the computation also runs on fake
CUDA tensors, where any data-dependent op would raise.
"""

import warnings

import pytest
import torch
from test_nms import greedy_reference, wide_size_case
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import boxloss
import boxloss.nms as nms_mod

aten = torch.ops.aten

# ops that read device data on the host, or whose output size depends on the data
_SYNC_OPS = {
    aten._local_scalar_dense,  # .item(), bool(t), int(t), float(t)
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.allclose,
}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostReads(TorchDispatchMode):
    """Counts host reads by op name (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def _count(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNC_OPS:
            self._count(packet.__name__)
        elif packet in _INDEX_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None
        ):
            self._count(f"{packet.__name__} with a mask")  # boolean indexing runs nonzero inside
        elif packet is aten.repeat_interleave and kwargs.get("output_size", args[3] if len(args) > 3 else None) is None:
            if isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
                self._count("repeat_interleave without output_size")
        return func(*args, **kwargs)

    @property
    def total(self):
        return sum(self.counts.values())


@pytest.fixture
def host_reads(monkeypatch):
    """A ``HostReads`` mode, with ``Tensor.tolist``, ``.cpu`` and ``.numpy`` counted too (they read
    memory directly, without an op the mode would see, on CPU tensors)."""
    mode = HostReads()
    for name in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            mode._count(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return mode


def test_counter_catches_each_kind_of_host_read(host_reads):
    x = torch.tensor([0.5, 0.0, 2.0])
    with host_reads:
        x.sum().item()
        bool(x[0] > 0)
        int(x.argmax())
        float(x.max())
        x.tolist()
        x.cpu()
        x.nonzero()
        x[x > 0]
        torch.unique(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.sum()  # not a read
    assert host_reads.total == 10, host_reads.counts


def _detector_like(n, n_cls, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes, scores = wide_size_case(g, n)
    return boxes, scores, torch.randint(0, n_cls, (n,), generator=g)


@pytest.mark.parametrize("t", [0.5, -0.2], ids=["t=0.5", "negative t"])
def test_device_path_syncs_once_for_5000_boxes_80_classes(t, host_reads, monkeypatch):
    """The budget of issue 19: <= 4 host reads per call for 5,000 boxes / 80 classes; the device
    formulation reads the suppression bits once. Its result is the greedy one."""
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    monkeypatch.setattr(nms_mod, "_masked_path", lambda device: True)
    boxes, scores, labels = _detector_like(5000, 80)
    with host_reads:
        keep = boxloss.batched_diou_nms(boxes, scores, labels, t)
    assert host_reads.counts == {"cpu": 1}, host_reads.counts
    assert host_reads.total <= 4
    assert torch.equal(keep, greedy_reference(boxes, scores, t, labels))


def test_weighted_nms_on_the_device_path_stays_in_budget(host_reads, monkeypatch):
    """Weighted NMS adds the cluster assignment to the greedy pass: one more read (the members)."""
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    monkeypatch.setattr(nms_mod, "_masked_path", lambda device: True)
    boxes, scores, labels = _detector_like(5000, 80)
    with host_reads:
        keep, _ = boxloss.batched_weighted_nms(boxes, scores, labels, 0.5)
    assert host_reads.counts == {"cpu": 1, "nonzero": 1}, host_reads.counts
    assert torch.equal(keep, greedy_reference(boxes, scores, 0.5, labels))


def test_device_path_reads_once_per_host_read_bytes(host_reads, monkeypatch):
    """Past ``_HOST_READ_BYTES`` of bits the device path reads in pieces: one read each, same result."""
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    monkeypatch.setattr(nms_mod, "_masked_path", lambda device: True)
    boxes, scores, labels = _detector_like(1200, 3, seed=1)
    want = boxloss.batched_diou_nms(boxes, scores, labels, 0.5)
    monkeypatch.setattr(nms_mod, "_DEVICE_BLOCK_VALUES", 1 << 14)
    monkeypatch.setattr(nms_mod, "_HOST_READ_BYTES", 1 << 15)  # ~1200^2 / 16 bytes of bits: 3-4 reads
    with host_reads:
        keep = boxloss.batched_diou_nms(boxes, scores, labels, 0.5)
    assert list(host_reads.counts) == ["cpu"] and 3 <= host_reads.counts["cpu"] <= 4, host_reads.counts
    assert torch.equal(keep, want)


def test_sparse_cpu_path_is_what_the_budget_excludes(host_reads, monkeypatch):
    """The CPU torch path (data-dependent sparse candidates) reads the host tens of times per call;
    the counter sees them, so the counts above are not an artefact of the counting."""
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    boxes, scores, labels = _detector_like(5000, 80)
    with host_reads:
        boxloss.batched_diou_nms(boxes, scores, labels, 0.5)
    assert host_reads.total > 10, host_reads.counts


def test_device_part_runs_on_fake_cuda_without_data_dependent_ops():
    """The device half (``_suppression_bits``, and the sort and gathers before it) on fake CUDA tensors:
    a data-dependent op or a CPU tensor mixed in would raise here."""
    with FakeTensorMode():
        boxes = torch.empty(5000, 4, device="cuda")
        scores = torch.empty(5000, device="cuda")
        labels = torch.empty(5000, dtype=torch.int64, device="cuda")
        order = torch.sort(scores, descending=True, stable=True)[1]
        cols = boxes.index_select(0, order).t().contiguous()
        cls = labels.index_select(0, order)
        for r0, r1, c0 in ((0, 3355, 0), (3355, 5000, 3352)):
            bits = nms_mod._suppression_bits(cols, cls, r0, r1, c0, 0.5, 1.0, True)
            assert bits.device.type == "cuda" and bits.dtype == torch.uint8
            assert bits.shape == (r1 - r0, (5000 - c0 + 7) // 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_syncs_per_call_under_sync_debug_mode():
    """On a GPU, CUDA itself reports each synchronisation (``set_sync_debug_mode("warn")``): <= 4 per
    call for 5,000 boxes / 80 classes (1 expected: the read of the bits), and the greedy result."""
    boxes, scores, labels = _detector_like(5000, 80)
    want = greedy_reference(boxes, scores, 0.5, labels)
    b, s, lab = boxes.cuda(), scores.cuda(), labels.cuda()
    boxloss.batched_diou_nms(b, s, lab, 0.5)  # warm-up: allocator, pinned memory
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keep = boxloss.batched_diou_nms(b, s, lab, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 4, [str(w.message) for w in syncs]
    assert torch.equal(keep.cpu(), want)
