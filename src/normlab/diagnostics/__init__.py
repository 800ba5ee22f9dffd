"""The lab's probes: what normalization does to a network, measured on any ``nn.Module``.

- :class:`GradientFlow` / :func:`gradient_flow`: per-layer gradient norms, pre-activation
  statistics (mean, std, 15/50/85th percentiles), saturated / dead fractions;
  :func:`preactivations` and :func:`unit_percentiles` for Fig. 1-style traces.
- :func:`hvp`, :func:`hessian_eigenvalues` (Lanczos or deflated power iteration),
  :func:`hessian_trace` (Hutchinson) — in BN's training mode, running statistics kept.
- :func:`landscape_along_gradient`: loss range, gradient predictiveness, β-smoothness.
- :func:`diagnose`: a verdict per layer and a recommendation.

Probes never print or plot; records are dataclasses with ``to_dict()``. Every probe leaves
the caller's modes, buffers and parameters as it found them.
"""

from normlab.diagnostics.curvature import (
    HessianEigen,
    HessianOperator,
    HessianTrace,
    hessian_eigenvalues,
    hessian_trace,
    hvp,
)
from normlab.diagnostics.diagnose import Diagnosis, LayerVerdict, diagnose, layer_ranges
from normlab.diagnostics.flow import (
    LAYER_TYPES,
    FlowResult,
    GradientFlow,
    LayerFlow,
    PreactivationStats,
    gradient_flow,
    preactivations,
    unit_percentiles,
)
from normlab.diagnostics.landscape import LandscapeProbe, landscape_along_gradient

__all__ = [
    "LAYER_TYPES",
    "Diagnosis",
    "FlowResult",
    "GradientFlow",
    "HessianEigen",
    "HessianOperator",
    "HessianTrace",
    "LandscapeProbe",
    "LayerFlow",
    "LayerVerdict",
    "PreactivationStats",
    "diagnose",
    "gradient_flow",
    "hessian_eigenvalues",
    "hessian_trace",
    "hvp",
    "landscape_along_gradient",
    "layer_ranges",
    "preactivations",
    "unit_percentiles",
]
