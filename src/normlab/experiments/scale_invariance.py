"""scale-invariance: BN(aWx) = BN(Wx), gradients scale by 1/a, and weight decay on such
weights changes the effective learning rate instead of limiting capacity.

For a > 0, the batch statistics of aWx are aμ and a²σ², so with ε = 0 the normalised
output is unchanged, and by the chain rule ∇_{aW} L = ∇_W L / a. The loss is a degree-0
homogeneous function of W, so (Euler) ⟨W, ∇_W L⟩ = 0: plain SGD can only grow ‖W‖
(‖W − η∇‖² = ‖W‖² + η²‖∇‖²). L2 weight decay shrinks ‖W‖ without changing the function,
and a step of size η on W moves the direction W/‖W‖ like a step η/‖W‖² would at unit
norm — the effective learning rate (van Laarhoven 2017; Zhang et al. 2019).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from normlab.data import load_digits
from normlab.experiments import _training as T
from normlab.experiments.base import AllChecks, Line, Plot, Progress, Result, Verdict, notify
from normlab.experiments.registry import register


@dataclass(frozen=True)
class Config:
    seed: int = 0
    scales: tuple[float, ...] = (1e-3, 1e-2, 0.1, 0.5, 2.0, 10.0, 1e2, 1e3)
    exact_tolerance: float = 1e-10  # float64, ε = 0
    steps: int = 1500
    batch: int = 64
    lr: float = 0.1
    weight_decay: float = 1e-2
    cos_tolerance: float = 1e-3  # |cos(W, ∇W)| during float32 training
    accuracy_tolerance: float = 0.02  # weight decay may not cost more than this


def _bn_out_and_grad(w: torch.Tensor, x: torch.Tensor, r: torch.Tensor, eps: float):
    """y = BN(x Wᵀ) in training mode (γ = 1, β = 0) and ∇_W of L = Σ r·y."""
    import normlab as nl

    w = w.detach().clone().requires_grad_(True)
    y = nl.functional.batch_norm(x @ w.t(), None, None, training=True, eps=eps)
    (y * r).sum().backward()
    return y.detach(), w.grad


@dataclass
class Exactness:
    """The float64 part: per scale a of :attr:`Config.scales`, max |BN(aWx) − BN(Wx)| and the
    relative error of a·∇_(aW)L against ∇_W L, with ε = 0 and with ε = 1e-5; and
    cos(W, ∇_W L) (Euler: 0)."""

    scale: list[float]
    out_err: list[float]
    grad_err: list[float]
    out_err_eps: list[float]
    grad_err_eps: list[float]
    euler_cos: float


def exactness(c: Config, g: torch.Generator) -> Exactness:
    """Invariance of outputs and 1/a scaling of gradients, float64, for ε = 0 and ε = 1e-5."""
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    w = torch.randn(16, 20, generator=g, dtype=torch.float64) / 20**0.5
    r = torch.randn(64, 16, generator=g, dtype=torch.float64)
    err: dict[float, tuple[list[float], list[float]]] = {}
    for eps in (0.0, 1e-5):
        y1, g1 = _bn_out_and_grad(w, x, r, eps)
        err[eps] = ([], [])
        for a in c.scales:
            ya, ga = _bn_out_and_grad(a * w, x, r, eps)
            err[eps][0].append(float((ya - y1).abs().max()))
            err[eps][1].append(float((a * ga - g1).abs().max() / g1.abs().max()))
    _, g1 = _bn_out_and_grad(w, x, r, 0.0)
    return Exactness(
        scale=list(c.scales),
        out_err=err[0.0][0],
        grad_err=err[0.0][1],
        out_err_eps=err[1e-5][0],
        grad_err_eps=err[1e-5][1],
        euler_cos=float((w * g1).sum() / (w.norm() * g1.norm())),
    )


@dataclass
class TrainingRun:
    """One training run: ‖W₁‖ before every update and after the last, the largest
    |cos(W₁, ∇W₁)| over the steps, and the final test accuracy."""

    weight_decay: float
    lr: float
    norms: list[float]
    max_abs_cos: float
    accuracy: float

    @property
    def eff_lr(self) -> list[float]:
        """The effective learning rate η/‖W₁‖² per step."""
        return [self.lr / n**2 for n in self.norms]

    @property
    def eff_lr_ratio(self) -> float:
        """η/‖W₁‖² at the end over at the start."""
        eff = self.eff_lr
        return eff[-1] / eff[0]


@dataclass
class Measurement:
    """What :class:`ScaleInvariance` measured: the exact part, and training without and
    with weight decay from the same initial weights."""

    exact: Exactness
    plain: TrainingRun
    decay: TrainingRun


def train_run(c: Config, weight_decay: float, progress, span) -> TrainingRun:
    """SGD on digits; L2 weight decay on the Linear weights only (not on BN's γ, β).
    Records ‖W₁‖ (the first layer, followed by BN), η/‖W₁‖² and cos(W₁, ∇W₁) per step."""
    split = load_digits(seed=c.seed)
    with T.seeded(c.seed):
        model = T.mlp(64, (128, 128), split.num_classes, norm="bn", activation="relu", bias=False)
    w1 = model[0].weight.detach()  # a view: follows the optimizer's in-place updates
    norms, cosines = [], []

    def before_update(_step, m):
        # W₁ as the gradient saw it: ⟨W₁, ∇W₁⟩ = 0 holds there, not after the step
        grad = m[0].weight.grad
        norms.append(float(w1.norm()))
        cosines.append(abs(float((w1 * grad).sum() / (w1.norm() * grad.norm()).clamp_min(1e-30))))

    hist = T.train(
        model,
        split,
        # plain SGD: the setting in which η/‖W₁‖² is the effective step (van Laarhoven 2017)
        momentum=0.0,
        weight_decay=weight_decay,
        weight_decay_on="weights",
        steps=c.steps,
        lr=c.lr,
        seed=c.seed,  # the same batches with and without weight decay
        batch_size=c.batch,
        on_gradient=before_update,
        progress=progress,
        progress_span=span,
        label=f"weight decay {weight_decay:g}",
    )
    norms.append(float(w1.norm()))
    return TrainingRun(weight_decay, c.lr, norms, max(cosines), hist.final_test_accuracy)


def _thin(values: list[float], k: int = 200) -> tuple[list[int], list[float]]:
    step = max(1, len(values) // k)
    idx = list(range(0, len(values), step))
    if idx[-1] != len(values) - 1:
        idx.append(len(values) - 1)
    return idx, [values[i] for i in idx]


@register
class ScaleInvariance(AllChecks):
    id = "scale-invariance"
    claim = (
        "BN(aWx) = BN(Wx); gradients scale by 1/a; with L2 weight decay the weight norm "
        "shrinks and the effective learning rate η/‖w‖² grows instead of capacity being limited"
    )
    source = "docs/sources.md#seed-002; van Laarhoven 2017; Zhang et al. 2019"
    reference = "formula (exact); η/‖w‖² grows under weight decay"
    seed_says = (
        "Scaling the weights before a BN layer by c > 0 scales the pre-activations and their "
        "standard deviation by c, which normalisation cancels, so the network's output does "
        "not change. L2 weight decay can then shrink ‖W‖ while γ compensates: it no longer "
        "limits capacity; since gradients through BN scale with 1/σ_B, shrinking ‖W‖ "
        "changes the effective step size instead."
    )
    Config = Config
    quick_overrides: ClassVar[dict] = {
        "steps": 150,
        "weight_decay": 5e-2,
        "scales": (1e-3, 0.1, 10.0, 1e3),
    }

    def rule(self, config: Config) -> str:
        tol = f"{config.exact_tolerance:g}"
        return (
            f"holds if (1) in float64 with ε = 0, for a in {list(config.scales)}, "
            f"max |BN(aWx) − BN(Wx)| ≤ {tol}, a·∇_(aW)L equals ∇_W L to {tol} (relative) and "
            f"cos(W, ∇_W L) ≤ {tol}; (2) while training, |cos(W₁, ∇W₁)| ≤ "
            f"{config.cos_tolerance:g} at every step; (3) without weight decay ‖W₁‖ ends "
            "higher than it started and η/‖W₁‖² lower, with weight decay ‖W₁‖ ends lower and "
            "η/‖W₁‖² higher; and (4) weight decay costs at most "
            f"{config.accuracy_tolerance:.0%} test accuracy (capacity not limited)."
        )

    def checks(self, config: Config, m: Measurement) -> dict[str, bool]:
        """The four parts of :meth:`rule`, each named, and whether it passed."""
        ex, plain, decay, tol = m.exact, m.plain, m.decay, config.exact_tolerance
        exact = max(ex.out_err) <= tol and max(ex.grad_err) <= tol and abs(ex.euler_cos) <= tol
        cos = max(plain.max_abs_cos, decay.max_abs_cos)
        norms = plain.norms[-1] > plain.norms[0] and decay.norms[-1] < decay.norms[0]
        return {
            "(1) exact in float64": exact,
            "(2) gradient orthogonal to W₁ in training": cos <= config.cos_tolerance,
            "(3) ‖W₁‖ and η/‖W₁‖² move as stated": (
                norms and decay.eff_lr_ratio > 1 > plain.eff_lr_ratio
            ),
            f"(4) weight decay costs ≤ {config.accuracy_tolerance:.0%} accuracy": (
                decay.accuracy >= plain.accuracy - config.accuracy_tolerance
            ),
        }

    def measure(self, config: Config, progress: Progress | None = None) -> Measurement:
        ex = exactness(config, torch.Generator().manual_seed(config.seed))
        notify(progress, 0.05, "exact part")
        return Measurement(
            exact=ex,
            plain=train_run(config, 0.0, progress, (0.05, 0.5)),
            decay=train_run(config, config.weight_decay, progress, (0.5, 1.0)),
        )

    def weight_decay_effect(self, m: Measurement) -> str:
        """What the notes say the training runs show when the rule holds."""
        return (
            "In training the weights never get that small, so weight decay acts on the "
            "effective learning rate: without it ‖W₁‖ can only grow (the gradient is "
            "orthogonal to W₁, |cos| below "
            f"{max(m.plain.max_abs_cos, m.decay.max_abs_cos):.0e} in float32), with it ‖W₁‖ "
            "shrinks and η/‖W₁‖² rises, while test accuracy is unchanged."
        )

    def present(self, config: Config, m: Measurement, verdict: Verdict) -> Result:
        c, ex, plain, decay = config, m.exact, m.plain, m.decay
        ratio_plain, ratio_decay = plain.eff_lr_ratio, decay.eff_lr_ratio
        worst_eps = max(ex.out_err_eps)
        x_plain, n_plain = _thin(plain.norms)
        x_decay, n_decay = _thin(decay.norms)
        wd = f"weight decay {c.weight_decay:g}"
        return self.verdict_result(
            config,
            verdict,
            measured=(
                f"max output change {max(ex.out_err):.0e}, gradient·a error "
                f"{max(ex.grad_err):.0e}; η/‖W₁‖² ×{ratio_decay:.1f} with wd {c.weight_decay:g} "
                f"vs ×{ratio_plain:.2f} without; accuracy {decay.accuracy:.1%} vs "
                f"{plain.accuracy:.1%}"
            ),
            setup=(
                "Exact part: x (64×20), W (16×20), a random linear loss on BN(xWᵀ) "
                "(normlab.functional.batch_norm, training mode, γ = 1, β = 0), float64, "
                f"ε = 0 and ε = 1e-5. Training: MLP 64-128-128-10 with BN after each hidden "
                f"Linear (no bias) and ReLU on the digits, plain SGD (no momentum) lr {c.lr:g}, "
                f"batch {c.batch}, {c.steps} steps, L2 weight decay {c.weight_decay:g} on the "
                "Linear weights only (not on γ, β) vs none; W₁ is the first layer's weight. "
                "Small scale: digits and an MLP instead of ImageNet-scale CNNs."
            ),
            metrics={
                "exact": asdict(ex),
                "eff_lr_ratio_no_decay": ratio_plain,
                "eff_lr_ratio_decay": ratio_decay,
                "norm_start_end_no_decay": [plain.norms[0], plain.norms[-1]],
                "norm_start_end_decay": [decay.norms[0], decay.norms[-1]],
                "max_abs_cos_no_decay": plain.max_abs_cos,
                "max_abs_cos_decay": decay.max_abs_cos,
                "accuracy_no_decay": plain.accuracy,
                "accuracy_decay": decay.accuracy,
            },
            tables={
                "Scaling W by a (float64)": {
                    "header": [
                        "a",
                        "max |Δy|, ε=0",
                        "grad·a rel. error, ε=0",
                        "max |Δy|, ε=1e-5",
                        "grad·a rel. error, ε=1e-5",
                    ],
                    "rows": [
                        list(r)
                        for r in zip(
                            ex.scale, ex.out_err, ex.grad_err, ex.out_err_eps, ex.grad_err_eps
                        )
                    ],
                }
            },
            plots=[
                Plot(
                    title="‖W₁‖ during training",
                    xlabel="step",
                    ylabel="‖W₁‖_F",
                    lines=[
                        Line("no weight decay", x_plain, n_plain),
                        Line(wd, x_decay, n_decay),
                    ],
                ),
                Plot(
                    title="Effective learning rate η/‖W₁‖²",
                    xlabel="step",
                    ylabel="η/‖W₁‖²",
                    logy=True,
                    lines=[
                        Line("no weight decay", x_plain, [c.lr / n**2 for n in n_plain]),
                        Line(wd, x_decay, [c.lr / n**2 for n in n_decay]),
                    ],
                ),
                Plot(
                    title="BN(aWx) − BN(Wx): exact with ε = 0, broken by ε when a²σ² ≲ ε",
                    xlabel="scale a",
                    ylabel="max abs difference",
                    logx=True,
                    logy=True,
                    lines=[
                        Line("ε = 0", ex.scale, [max(v, 1e-17) for v in ex.out_err], "o-"),
                        Line("ε = 1e-5", ex.scale, [max(v, 1e-17) for v in ex.out_err_eps], "s-"),
                    ],
                ),
            ],
            notes=(
                "The invariance is exact only with ε = 0: with ε > 0 the output is "
                "(x − μ)/sqrt(σ² + ε/a²) after rescaling, so shrinking W until a²σ² is near ε "
                f"changes the function (here up to {worst_eps:.2g} for "
                f"a = {ex.scale[ex.out_err_eps.index(worst_eps)]:g} with ε = 1e-5). "
                + (self.failures(c, m) or self.weight_decay_effect(m))
            ),
        )
