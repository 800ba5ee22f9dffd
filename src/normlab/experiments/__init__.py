"""One module per claim of docs/claims.md, and a registry (see ``registry``)."""

from normlab.experiments.base import Experiment, Line, Plot, Result
from normlab.experiments.registry import all_ids, get, register

__all__ = ["Experiment", "Line", "Plot", "Result", "all_ids", "get", "register"]
