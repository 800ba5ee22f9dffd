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

from dataclasses import dataclass
from typing import ClassVar

import torch

from normlab.data import load_digits
from normlab.experiments import _training as T
from normlab.experiments.base import Experiment, Line, Plot, Result, notify
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


def exactness(c: Config, g: torch.Generator) -> dict:
    """Invariance of outputs and 1/a scaling of gradients, float64, for ε = 0 and ε = 1e-5."""
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    w = torch.randn(16, 20, generator=g, dtype=torch.float64) / 20**0.5
    r = torch.randn(64, 16, generator=g, dtype=torch.float64)
    out = {"scale": [], "out_err": [], "grad_err": [], "out_err_eps": [], "grad_err_eps": []}
    for eps, suffix in ((0.0, ""), (1e-5, "_eps")):
        y1, g1 = _bn_out_and_grad(w, x, r, eps)
        for a in c.scales:
            ya, ga = _bn_out_and_grad(a * w, x, r, eps)
            if not suffix:
                out["scale"].append(a)
            out["out_err" + suffix].append(float((ya - y1).abs().max()))
            out["grad_err" + suffix].append(float((a * ga - g1).abs().max() / g1.abs().max()))
    _, g1 = _bn_out_and_grad(w, x, r, 0.0)
    out["euler_cos"] = float((w * g1).sum() / (w.norm() * g1.norm()))
    return out


def train_run(c: Config, weight_decay: float, progress, span) -> dict:
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
        steps=c.steps,
        lr=c.lr,
        batch_size=c.batch,
        momentum=0.0,
        weight_decay=weight_decay,
        weight_decay_on="weights",
        seed=c.seed,
        on_gradient=before_update,
        progress=progress,
        progress_span=span,
        label=f"weight decay {weight_decay:g}",
    )
    norms.append(float(w1.norm()))
    return {
        "norms": norms,
        "eff_lr": [c.lr / n**2 for n in norms],
        "max_abs_cos": max(cosines),
        "accuracy": hist.final_test_accuracy,
    }


def _thin(values: list[float], k: int = 200) -> tuple[list[int], list[float]]:
    step = max(1, len(values) // k)
    idx = list(range(0, len(values), step))
    if idx[-1] != len(values) - 1:
        idx.append(len(values) - 1)
    return idx, [values[i] for i in idx]


@register
class ScaleInvariance(Experiment):
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

    def run(self, config: Config, progress=None) -> Result:
        c = config
        ex = exactness(c, torch.Generator().manual_seed(c.seed))
        notify(progress, 0.05, "exact part")
        plain = train_run(c, 0.0, progress, (0.05, 0.5))
        decay = train_run(c, c.weight_decay, progress, (0.5, 1.0))
        exact_ok = (
            max(ex["out_err"]) <= c.exact_tolerance
            and max(ex["grad_err"]) <= c.exact_tolerance
            and abs(ex["euler_cos"]) <= c.exact_tolerance
        )
        ratio_plain = plain["eff_lr"][-1] / plain["eff_lr"][0]
        ratio_decay = decay["eff_lr"][-1] / decay["eff_lr"][0]
        orth_ok = max(plain["max_abs_cos"], decay["max_abs_cos"]) <= c.cos_tolerance
        norms_ok = (
            plain["norms"][-1] > plain["norms"][0]
            and decay["norms"][-1] < decay["norms"][0]
            and ratio_decay > 1 > ratio_plain
        )
        capacity_ok = decay["accuracy"] >= plain["accuracy"] - c.accuracy_tolerance
        holds = exact_ok and orth_ok and norms_ok and capacity_ok
        worst_eps = max(ex["out_err_eps"])
        x_plain, n_plain = _thin(plain["norms"])
        x_decay, n_decay = _thin(decay["norms"])
        return self.result(
            config,
            verdict="holds" if holds else "fails",
            rule=(
                f"holds if (1) in float64 with ε = 0, for a in {list(c.scales)}, "
                f"max |BN(aWx) − BN(Wx)| ≤ {c.exact_tolerance:g}, a·∇_(aW)L equals ∇_W L to "
                f"{c.exact_tolerance:g} (relative) and cos(W, ∇_W L) ≤ {c.exact_tolerance:g}; "
                f"(2) while training, |cos(W₁, ∇W₁)| ≤ {c.cos_tolerance:g} at every step; (3) "
                "without weight decay ‖W₁‖ ends higher than it started and η/‖W₁‖² lower, "
                "with weight decay ‖W₁‖ ends lower and η/‖W₁‖² higher; and (4) weight decay "
                f"costs at most {c.accuracy_tolerance:.0%} test accuracy (capacity not limited)."
            ),
            measured=(
                f"max output change {max(ex['out_err']):.0e}, gradient·a error "
                f"{max(ex['grad_err']):.0e}; η/‖W₁‖² ×{ratio_decay:.1f} with wd {c.weight_decay:g} "
                f"vs ×{ratio_plain:.2f} without; accuracy {decay['accuracy']:.1%} vs "
                f"{plain['accuracy']:.1%}"
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
                "exact": ex,
                "eff_lr_ratio_no_decay": ratio_plain,
                "eff_lr_ratio_decay": ratio_decay,
                "norm_start_end_no_decay": [plain["norms"][0], plain["norms"][-1]],
                "norm_start_end_decay": [decay["norms"][0], decay["norms"][-1]],
                "max_abs_cos_no_decay": plain["max_abs_cos"],
                "max_abs_cos_decay": decay["max_abs_cos"],
                "accuracy_no_decay": plain["accuracy"],
                "accuracy_decay": decay["accuracy"],
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
                            ex["scale"],
                            ex["out_err"],
                            ex["grad_err"],
                            ex["out_err_eps"],
                            ex["grad_err_eps"],
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
                        Line(f"weight decay {c.weight_decay:g}", x_decay, n_decay),
                    ],
                ),
                Plot(
                    title="Effective learning rate η/‖W₁‖²",
                    xlabel="step",
                    ylabel="η/‖W₁‖²",
                    logy=True,
                    lines=[
                        Line("no weight decay", x_plain, [c.lr / n**2 for n in n_plain]),
                        Line(
                            f"weight decay {c.weight_decay:g}",
                            x_decay,
                            [c.lr / n**2 for n in n_decay],
                        ),
                    ],
                ),
                Plot(
                    title="BN(aWx) − BN(Wx): exact with ε = 0, broken by ε when a²σ² ≲ ε",
                    xlabel="scale a",
                    ylabel="max abs difference",
                    logx=True,
                    logy=True,
                    lines=[
                        Line("ε = 0", ex["scale"], [max(v, 1e-17) for v in ex["out_err"]], "o-"),
                        Line(
                            "ε = 1e-5",
                            ex["scale"],
                            [max(v, 1e-17) for v in ex["out_err_eps"]],
                            "s-",
                        ),
                    ],
                ),
            ],
            notes=(
                "The invariance is exact only with ε = 0: with ε > 0 the output is "
                "(x − μ)/sqrt(σ² + ε/a²) after rescaling, so shrinking W until a²σ² is near ε "
                f"changes the function (here up to {worst_eps:.2g} for a = {c.scales[0]:g} "
                "with ε = 1e-5). In training the weights never get that small, so weight decay "
                "acts on the effective learning rate: without it ‖W₁‖ can only grow "
                "(the gradient is orthogonal to W₁, |cos| below "
                f"{max(plain['max_abs_cos'], decay['max_abs_cos']):.0e} in float32), with it "
                "‖W₁‖ shrinks and η/‖W₁‖² rises, while test accuracy is unchanged."
            ),
        )
