"""Fixtures shared by tests/boxloss and tests/detectors."""

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake CUDA tensors, without a GPU or a driver, for the duration of the test.

    Inside, ``torch.empty(..., device="cuda")`` makes a tensor that has a shape, a dtype and a
    device but no data: every op computes only its output's metadata, so a CUDA code path runs
    end to end and mixing devices raises ``FakeTensorDeviceMismatchError`` as a GPU would.
    With a ``ShapeEnv``, an op whose output size depends on the data (``nonzero``, boolean masks)
    gets a symbolic size and goes on. What it cannot do: decide anything from a value (``if
    t.any()``, ``int(t)``, ``max(1, mask.nonzero().numel())``: ``GuardOnDataDependentSymNode`` or
    ``DataDependentOutputException``). Values are never checked here; the CPU tests do that.

    ``BOXLOSS_KERNEL=eager``: the eager kernel is made of torch ops, which fake tensors run; a
    compiled or Triton kernel reads memory that fake tensors do not have.
    """
    monkeypatch.setenv("BOXLOSS_KERNEL", "eager")
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        yield mode



def _manager_classes():
    """mmengine's named-singleton classes (MMLogger, MessageHub, DefaultScope, Visualizer, ...), if
    mmengine is loaded at all (the boxloss tests never import it)."""
    import sys

    manager = sys.modules.get("mmengine.utils.manager")
    if manager is None:
        return []
    found, todo = [], [manager.ManagerMixin]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.append(sub)
            todo.append(sub)
    return [c for c in found if isinstance(getattr(c, "_instance_dict", None), dict)]


@pytest.fixture(autouse=True)
def _forget_mmengine_instances():
    """Drop the mmengine instances a test created. They are keyed by the experiment name, which is
    the config's name and the time to the second: a second in-process run within the same second
    would otherwise get the first run's logger, whose handlers write to a capture stream pytest has
    closed (a "--- Logging error ---" in the next test's stderr)."""
    before = {cls: set(cls._instance_dict) for cls in _manager_classes()}
    yield
    for cls in _manager_classes():
        for name in set(cls._instance_dict) - before.get(cls, set()):
            del cls._instance_dict[name]
