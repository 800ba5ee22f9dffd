"""What ``normlab bench`` measures.

* :mod:`normlab.bench.layers`: one normalization layer (BN + activation) against torch and
  a plain copy; its names are re-exported here (``from normlab.bench import run_case``).
* :mod:`normlab.bench.zoo`: torchvision-style model builders (ResNet, MobileNet, RegNet)
  written in normlab, so that torchvision is not needed.
* :mod:`normlab.bench.models`: the whole training step and eval forward of a zoo model,
  torch eager against normlab (and ``torch.compile``).
"""

from normlab.bench.layers import (
    CASES,
    QUICK_CASES,
    Case,
    environment,
    jit_warmup,
    run_case,
    saved_tensors,
)

__all__ = [
    "CASES",
    "QUICK_CASES",
    "Case",
    "environment",
    "jit_warmup",
    "run_case",
    "saved_tensors",
]
