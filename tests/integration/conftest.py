import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_stack(monkeypatch):
    """Every stack test starts from torch's and normlab's defaults: no compiled code or
    dynamo caches left by the previous test, the default kernel selection
    (``NORMLAB_KERNELS`` unset means 'auto') and the suite's thread count restored."""
    monkeypatch.delenv("NORMLAB_KERNELS", raising=False)
    threads = torch.get_num_threads()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)
