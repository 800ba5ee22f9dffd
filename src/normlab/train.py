"""Entry point ``python -m normlab.train`` / ``torchrun … -m normlab.train`` (= ``normlab
train``), and the old import path of :mod:`normlab.recipes.ddp`, re-exported here.

The recipe itself lives in :mod:`normlab.recipes.ddp`; this module only keeps the documented
``-m normlab.train`` entry and ``from normlab.train import TrainConfig, train`` working.
"""

from normlab.recipes.ddp import (
    TORCHRUN_VARS,
    TrainConfig,
    TrainResult,
    build_model,
    run_rank,
    train,
    under_torchrun,
)

__all__ = [
    "TORCHRUN_VARS",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "run_rank",
    "train",
    "under_torchrun",
]

if __name__ == "__main__":  # an entry point: the command line runs only when executed
    import sys

    from normlab.cli import main

    main(["train", *sys.argv[1:]])
