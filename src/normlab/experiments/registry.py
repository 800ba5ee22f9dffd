"""The experiment registry: id → Experiment instance, in the order of docs/claims.md."""

from __future__ import annotations

import importlib

from normlab.experiments.base import Experiment

# Module names under normlab.experiments, one per section of docs/claims.md.
CLAIM_IDS: tuple[str, ...] = (
    "vanishing",
    "mnist-fig1",
    "sigmoid-gain",
    "relu-half",
    "landscape",
    "learning-rate",
    "ema-bias",
    "inference-gap",
    "jacobian",
    "scale-invariance",
    "noise-regularisation",
    "renorm",
    "family-batch-size",
    "init-explosion",
    "worked-example",
    "sync",
)

_REGISTRY: dict[str, Experiment] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: register an experiment under its ``id`` (once)."""
    if cls.id in _REGISTRY:
        raise ValueError(f"experiment id {cls.id!r} registered twice")
    _REGISTRY[cls.id] = cls()
    return cls


def _load_all() -> None:
    for claim_id in CLAIM_IDS:
        module = "normlab.experiments." + claim_id.replace("-", "_")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def get(claim_id: str) -> Experiment:
    _load_all()
    if claim_id not in _REGISTRY:
        known = ", ".join(all_ids())
        raise KeyError(f"unknown experiment {claim_id!r}; known: {known}, or 'all'")
    return _REGISTRY[claim_id]


def all_ids() -> list[str]:
    """Registered ids, in docs/claims.md order first."""
    _load_all()
    order = {c: i for i, c in enumerate(CLAIM_IDS)}
    return sorted(_REGISTRY, key=lambda c: (order.get(c, len(order)), c))
