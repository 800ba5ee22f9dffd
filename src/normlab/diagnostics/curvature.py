"""Curvature of the loss: Hessian-vector products, top eigenvalues, Hutchinson trace.

All three work on H = ∇²_θ L(θ) for the loss of a model on one batch, without ever
forming H (n × n for n parameters): a Hessian-vector product is the gradient of
⟨∇L, v⟩, two backward passes (Pearlmutter 1994). The gradient graph is built once per
call and reused for every product.

BatchNorm in training mode: the loss is the *batch-statistics* loss — the function the
optimiser sees, with the mean and variance of the batch as functions of θ — and the
running statistics and ``num_batches_tracked`` are restored afterwards (the one forward
pass would otherwise move them). The caller's modes are never changed. PyHessian calls
``model.eval()``, which silently replaces that Hessian by the one of a different
(running-statistics) network.

References: Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation
1994; Lanczos 1950 and Golub & Van Loan, "Matrix Computations" §10.1 (Lanczos with full
reorthogonalisation); Hutchinson, "A stochastic estimator of the trace of the influence
matrix", 1989; Yao et al., "PyHessian", 2020.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from normlab.diagnostics._batch import LossFn, batch_loss, trainable_params
from normlab.diagnostics._state import preserved


class HessianOperator:
    """v ↦ H·v at the current parameters, for one loss graph.

    Args:
        loss: a scalar computed from ``params`` (with autograd history).
        params: the tensors to differentiate with respect to.

    ``matvec`` takes and returns a flat float64 vector of length ``num_params`` (the
    parameters concatenated in order); products are computed in the parameters' dtype.
    Parameters the loss does not depend on have zero Hessian rows and columns.
    """

    def __init__(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self._used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._used]
        self.gradient = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g.detach()).reshape(-1).double()
                for p, g in zip(self.params, grads)
            ]
        )
        self.sizes = [p.numel() for p in self.params]
        self.num_params = sum(self.sizes)
        self.products = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H·v for a flat vector v (any float dtype); returns float64."""
        if v.shape != (self.num_params,):
            raise ValueError(
                f"HessianOperator.matvec: v must have shape ({self.num_params},), got "
                f"{tuple(v.shape)}"
            )
        self.products += 1
        out = torch.zeros(self.num_params, dtype=torch.float64, device=v.device)
        if not self._grads:
            return out
        pieces = unflatten(v, self.params)
        hv = torch.autograd.grad(
            self._grads,
            [self.params[i] for i in self._used],
            [pieces[i] for i in self._used],
            retain_graph=True,
            allow_unused=True,
        )
        offsets = [0]
        for s in self.sizes:
            offsets.append(offsets[-1] + s)
        for i, h in zip(self._used, hv):
            if h is not None:
                out[offsets[i] : offsets[i + 1]] = h.reshape(-1).double()
        return out


def unflatten(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped (and typed) like ``like``."""
    out, start = [], 0
    for p in like:
        out.append(v[start : start + p.numel()].view(p.shape).to(p.dtype))
        start += p.numel()
    return out


def hvp(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Hessian-vector product H·v of the scalar ``loss_fn()`` with respect to ``params``.

    Args:
        loss_fn: a closure recomputing the loss from ``params`` (called once).
        params: tensors with ``requires_grad``; v: tensors of the same shapes.

    Returns:
        H·v as tensors shaped like ``params``. Does not touch ``.grad``. State the closure
        changes (BatchNorm running statistics) is the caller's: use
        :func:`hessian_eigenvalues`/:func:`hessian_trace` for a model-level probe that
        restores it.
    """
    params = list(params)
    v = list(v)
    if len(v) != len(params) or any(a.shape != b.shape for a, b in zip(v, params)):
        raise ValueError(
            "hvp: v must be a sequence of tensors with the shapes of params, got shapes "
            f"{[tuple(t.shape) for t in v]} for params {[tuple(p.shape) for p in params]}"
        )
    op = HessianOperator(loss_fn(), params)
    flat = torch.cat([t.detach().reshape(-1).double() for t in v])
    return [h.to(p.dtype) for h, p in zip(unflatten(op.matvec(flat), params), params)]


@dataclass(frozen=True)
class HessianEigen:
    """Top eigenvalues of the Hessian.

    Attributes:
        eigenvalues: k values, largest first (by value for Lanczos with
            ``which='largest'``, by magnitude otherwise).
        residuals: ‖H·u − λ·u‖ for each returned unit eigenvector u.
        method: 'lanczos' or 'power'.
        iterations: Hessian-vector products used.
        num_params: n, the dimension of H.
        eigenvectors: (k, n) float64 unit vectors (not part of ``to_dict``).
    """

    eigenvalues: list[float]
    residuals: list[float]
    method: str
    iterations: int
    num_params: int
    eigenvectors: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "eigenvalues": list(self.eigenvalues),
            "residuals": list(self.residuals),
            "method": self.method,
            "iterations": self.iterations,
            "num_params": self.num_params,
        }


@dataclass(frozen=True)
class HessianTrace:
    """Hutchinson estimate tr(H) ≈ mean_i vᵢᵀ H vᵢ with its standard error."""

    trace: float
    stderr: float
    samples: int
    distribution: str
    num_params: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "stderr": self.stderr,
            "samples": self.samples,
            "distribution": self.distribution,
            "num_params": self.num_params,
        }


def _operator(model, loss_fn, batch, params, where) -> tuple[HessianOperator, list]:
    params = trainable_params(model) if params is None else list(params)
    loss = batch_loss(model, batch, loss_fn, where)
    return HessianOperator(loss, params), params


def _random_unit(n: int, generator: torch.Generator) -> torch.Tensor:
    v = torch.randn(n, dtype=torch.float64, generator=generator)
    return v / v.norm()


def _lanczos(op: HessianOperator, k: int, max_iter: int, tol: float, which: str, gen):
    """Lanczos with full reorthogonalisation; returns (values, vectors) of the top k."""
    n = op.num_params
    m = min(n, max_iter)
    basis = torch.zeros(m, n, dtype=torch.float64)
    alphas: list[float] = []
    betas: list[float] = []
    q = _random_unit(n, gen)
    beta = 0.0
    for j in range(m):
        basis[j] = q
        w = op.matvec(q)
        alpha = float(w @ q)
        w = w - alpha * q - (beta * basis[j - 1] if j > 0 else 0.0)
        # twice is enough (Kahan / Parlett) to keep the basis orthogonal to machine precision
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        beta = float(w.norm())
        size = j + 1
        if size >= k:
            theta, s = _tridiagonal_eig(alphas, betas)
            idx = _select(theta, k, which)
            # Ritz residual of the i-th pair is beta_{j+1} · |last component of s_i|
            residual = beta * s[-1, idx].abs()
            scale = theta[idx].abs().clamp_min(1e-30)
            if bool((residual <= tol * scale).all()) or size == m:
                break
        if beta <= 1e-12 * max(1.0, abs(alpha)):  # invariant subspace found: exact
            break
        betas.append(beta)
        q = w / beta
    theta, s = _tridiagonal_eig(alphas, betas[: len(alphas) - 1])
    idx = _select(theta, min(k, len(alphas)), which)
    vectors = s[:, idx].T @ basis[: len(alphas)]
    return theta[idx], vectors


def _tridiagonal_eig(alphas: list[float], betas: list[float]):
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        b = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return torch.linalg.eigh(t)


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    key = theta if which == "largest" else theta.abs()
    return torch.argsort(key, descending=True)[:k]


def _power(op: HessianOperator, k: int, max_iter: int, tol: float, gen):
    """Power iteration with deflation (PyHessian's method): the k eigenvalues of largest
    magnitude, one at a time, each on H − Σ λⱼ uⱼuⱼᵀ."""
    values: list[float] = []
    vectors: list[torch.Tensor] = []
    for _ in range(k):
        v = _random_unit(op.num_params, gen)
        lam = math.nan
        for _ in range(max_iter):
            for u in vectors:  # keep v out of the found eigenspaces
                v = v - (u @ v) * u
            v = v / v.norm().clamp_min(1e-300)
            w = op.matvec(v)
            for lam_j, u in zip(values, vectors):
                w = w - lam_j * (u @ v) * u
            new = float(v @ w)
            norm = float(w.norm())
            if norm == 0.0:
                lam = 0.0
                break
            converged = not math.isnan(lam) and abs(new - lam) <= tol * max(abs(new), 1e-30)
            lam = new
            v = w / norm
            if converged:
                break
        values.append(lam)
        vectors.append(v)
    vals = torch.tensor(values, dtype=torch.float64)
    order = torch.argsort(vals.abs(), descending=True)  # close pairs can come out swapped
    return vals[order], torch.stack(vectors)[order]


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    k: int = 1,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    which: Literal["largest", "magnitude"] = "largest",
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    params: Sequence[torch.Tensor] | None = None,
) -> HessianEigen:
    """The top-k eigenvalues of the Hessian of the loss of ``model`` on ``batch``.

    Args:
        model: probed in its current mode(s); buffers and modes are restored.
        loss_fn, batch: ``loss_fn(model(inputs), target)`` for ``batch = (inputs, target)``
            (None: cross-entropy / MSE by target dtype), or ``loss_fn(model(batch))``.
        k: how many eigenvalues.
        method: 'lanczos' (default; Krylov subspace of up to ``max_iter`` Hessian-vector
            products, full reorthogonalisation, stops when every Ritz residual is below
            ``tol``·|θ|; exact once the subspace reaches n) or 'power' (power iteration with
            deflation, ``max_iter`` products per eigenvalue, stops when λ changes by less
            than ``tol``·|λ|; always by magnitude).
        which: 'largest' algebraic (default) or largest 'magnitude' (Lanczos only; the
            Hessian of a non-convex loss has negative eigenvalues).
        seed: of the random start vector (results are deterministic for a seed).
        params: the parameters (default: all with ``requires_grad``).

    Returns:
        :class:`HessianEigen`, with residuals ‖Hu − λu‖ computed by one more product each.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"hessian_eigenvalues: k must be a positive int, got {k!r}")
    if method not in ("lanczos", "power"):
        raise ValueError(
            f"hessian_eigenvalues: method must be 'lanczos' or 'power', got {method!r}"
        )
    if which not in ("largest", "magnitude"):
        raise ValueError(
            f"hessian_eigenvalues: which must be 'largest' or 'magnitude', got {which!r}"
        )
    if max_iter < 1 or not tol > 0:
        raise ValueError(
            f"hessian_eigenvalues: need max_iter ≥ 1 and tol > 0, got {max_iter}, {tol}"
        )
    gen = torch.Generator().manual_seed(seed)
    with preserved(model):
        op, _ = _operator(model, loss_fn, batch, params, "hessian_eigenvalues")
        if k > op.num_params:
            raise ValueError(
                f"hessian_eigenvalues: k={k} exceeds the number of parameters {op.num_params}"
            )
        if method == "lanczos":
            values, vectors = _lanczos(op, k, max_iter, tol, which, gen)
        else:
            values, vectors = _power(op, k, max_iter, tol, gen)
        used = op.products
        residuals = [
            float((op.matvec(u) - lam * u).norm()) for lam, u in zip(values.tolist(), vectors)
        ]
    return HessianEigen(
        eigenvalues=values.tolist(),
        residuals=residuals,
        method=method,
        iterations=used,
        num_params=op.num_params,
        eigenvectors=vectors,
    )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    *,
    samples: int = 64,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    seed: int = 0,
    params: Sequence[torch.Tensor] | None = None,
) -> HessianTrace:
    """Hutchinson's estimate of tr(H): the mean of vᵀHv over random v with E[vvᵀ] = I.

    Rademacher probes (±1) have the least variance, Var(vᵀHv) = 2·Σ_{i≠j} H_ij²; Gaussian
    ones add 2·Σ H_ii². The standard error is the sample std / √samples. Arguments as
    :func:`hessian_eigenvalues`; modes and buffers are restored.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"hessian_trace: samples must be a positive int, got {samples!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(
            f"hessian_trace: distribution must be 'rademacher' or 'gaussian', got {distribution!r}"
        )
    gen = torch.Generator().manual_seed(seed)
    with preserved(model):
        op, _ = _operator(model, loss_fn, batch, params, "hessian_trace")
        values = []
        for _ in range(samples):
            if distribution == "rademacher":
                v = torch.randint(0, 2, (op.num_params,), generator=gen).double() * 2 - 1
            else:
                v = torch.randn(op.num_params, dtype=torch.float64, generator=gen)
            values.append(float(v @ op.matvec(v)))
    t = torch.tensor(values, dtype=torch.float64)
    stderr = float(t.std() / math.sqrt(samples)) if samples > 1 else math.inf
    return HessianTrace(
        trace=float(t.mean()),
        stderr=stderr,
        samples=samples,
        distribution=distribution,
        num_params=op.num_params,
    )
