"""torch.ao quantization with normlab's layers (src/normlab/tools/quantization.py): the
same model with torch's BN and with normlab's, in the same state, through eager PTQ
(fuse_modules → prepare → calibrate → convert), eager QAT (fuse_modules_qat →
prepare_qat → training steps → convert) and FX mode (prepare_fx / prepare_qat_fx after
to_torch_for_quantization) gives bit-identical quantized outputs: the fuser methods hand
torch's fusers torch's BN holding the same tensors, so everything after fusion is torch's
own code on the same numbers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.quantization.fuser_method_mappings import get_fuser_method
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

import normlab as nl
from normlab.tools import quantization as nq

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.ao.quantization's own
    pytest.mark.filterwarnings("ignore::UserWarning:torch"),  # observers' reduce_range etc.
]

ENGINES = [e for e in ("x86", "qnnpack") if e in torch.backends.quantized.supported_engines]
assert ENGINES, torch.backends.quantized.supported_engines  # no test may be skipped


@pytest.fixture(params=ENGINES)
def engine(request):
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = request.param
    yield request.param
    torch.backends.quantized.engine = before


class ConvNet(nn.Module):
    """quant → Conv2d → BN → ReLU(inplace) → Conv2d → BN → ReLU → AdaptiveAvgPool →
    Linear → dequant (the stubs are eager mode's; FX ignores them)."""

    def __init__(self, bn: type, **bn_kwargs) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), bn(6, **bn_kwargs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), bn(6, **bn_kwargs)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x):  # (N, 3, H, W) -> (N, 4)
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.dequant(self.fc(torch.flatten(self.pool(x), 1)))


FUSE = [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"]]


def _batch(seed: int, n: int = 8, shape=(3, 6, 6)) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


def _randomise_bn(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in module.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.6 - 0.3)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(12)
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("weight") and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("bias") and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) - 0.5)


def _pair(bn: type = nl.nn.BatchNorm2d, **bn_kwargs) -> tuple[ConvNet, ConvNet]:
    """(torch-BN model, normlab-BN model) in the same state."""
    torch.manual_seed(0)
    theirs = ConvNet(nn.BatchNorm2d)
    _randomise_bn(theirs)
    ours = ConvNet(bn, **bn_kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Every tensor of src's state_dict into dst's, in order (names may differ)."""
    a, b = src.state_dict(), dst.state_dict()
    assert len(a) == len(b), (list(a), list(b))
    with torch.no_grad():
        for v, w in zip(a.values(), b.values()):
            w.copy_(v)


def _assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- registration --------------------------------------------------------------------------


def test_normlab_patterns_are_registered_and_torchs_left_alone():
    from torch.ao.quantization import fuser_method_mappings as fmm

    registered = set(nq.registered_fuser_patterns())
    nlnn = nl.nn
    for pattern in [
        (nn.Conv2d, nlnn.BatchNorm2d),
        (nn.Conv2d, nlnn.BatchNorm2d, nn.ReLU),
        (nn.Conv1d, nlnn.BatchNorm1d),
        (nn.Conv3d, nlnn.BatchNorm3d, nn.ReLU),
        (nn.Linear, nlnn.BatchNorm1d),
        (nn.ConvTranspose2d, nlnn.BatchNorm2d),
        (nlnn.BatchNorm2d, nn.ReLU),
        (nlnn.BatchNorm3d, nn.ReLU),
        (nn.Conv2d, nlnn.BatchNorm),
        (nn.Linear, nlnn.BatchNorm),
        (nn.Conv2d, nlnn.BatchRenorm2d),
        (nn.Conv2d, nlnn.GhostBatchNorm2d, nn.ReLU),
        (nn.Conv2d, nlnn.FrozenBatchNorm2d, nn.ReLU),
    ]:
        assert pattern in registered, pattern
        assert get_fuser_method(pattern).__module__ == "normlab.tools.quantization"
    assert fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD[(nn.Conv2d, nn.BatchNorm2d)] is fmm.fuse_conv_bn
    # mismatched ranks stay unregistered, as torch has none
    assert (nn.Conv2d, nlnn.BatchNorm1d) not in registered
    assert nq.register_fuser_methods() == nq.registered_fuser_patterns()  # idempotent


# -- eager mode: the whole model -----------------------------------------------------------


def test_eager_ptq_quantizes_to_torchs_numbers(engine):
    results = []
    for model in _pair():
        model.eval()
        model.qconfig = tq.get_default_qconfig(engine)
        fused = tq.fuse_modules(model, FUSE)
        prepared = tq.prepare(fused)
        for seed in (1, 2):  # calibrate
            prepared(_batch(seed))
        quantized = tq.convert(prepared)
        results.append((fused, quantized, quantized(_batch(3))))
    (fa, qa, ya), (fb, qb, yb) = results
    assert [type(m) for m in fa.modules()] == [type(m) for m in fb.modules()]
    assert [type(m) for m in qa.modules()] == [type(m) for m in qb.modules()]
    assert type(qb.conv1).__name__ == "ConvReLU2d" and type(qb.conv1).__module__.startswith(
        "torch.ao.nn.intrinsic.quantized"
    )
    assert torch.equal(ya, yb)


def test_eager_qat_trains_and_quantizes_to_torchs_numbers(engine):
    results = []
    for model in _pair():
        model.train()
        model.qconfig = tq.get_default_qat_qconfig(engine)
        bn1_weight = model.bn1.weight
        fused = tq.fuse_modules_qat(model, FUSE, inplace=True)
        # The fused module holds the layer's own Parameter, as torch's fusion does.
        assert fused.conv1[1].weight is bn1_weight
        prepared = tq.prepare_qat(fused)
        opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for step in range(3):
            loss = prepared(_batch(10 + step)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        prepared.eval()
        quantized = tq.convert(prepared)
        results.append((prepared, torch.stack(losses), quantized(_batch(3))))
    (pa, la, ya), (pb, lb, yb) = results
    assert type(pb.conv1).__name__ == "ConvBnReLU2d"
    assert torch.equal(la, lb)
    _assert_state_equal(pa, pb)
    assert torch.equal(ya, yb)


# -- eager mode: every pattern, against torch's fusion of torch's modules -------------------

N = nl.nn


def _conv(rank, c_in=3, c_out=4):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank](c_in, c_out, 3, padding=1)


def _torch_bn(rank, c=4):
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank](c)


# (id, normlab modules, torch modules, input shape, modes); both lists are fused whole.
FUSIONS = [
    ("conv1d-bn", lambda: [_conv(1), N.BatchNorm1d(4)], lambda: [_conv(1), _torch_bn(1)],
     (4, 3, 5), ("ptq", "qat")),
    ("conv2d-bn-relu", lambda: [_conv(2), N.BatchNorm2d(4), nn.ReLU()],
     lambda: [_conv(2), _torch_bn(2), nn.ReLU()], (4, 3, 4, 3), ("ptq", "qat")),
    ("conv3d-bn-relu", lambda: [_conv(3), N.BatchNorm3d(4), nn.ReLU()],
     lambda: [_conv(3), _torch_bn(3), nn.ReLU()], (2, 3, 3, 2, 3), ("ptq", "qat")),
    ("linear-bn", lambda: [nn.Linear(3, 4), N.BatchNorm1d(4)],
     lambda: [nn.Linear(3, 4), _torch_bn(1)], (6, 3), ("ptq", "qat")),
    ("convT2d-bn", lambda: [nn.ConvTranspose2d(3, 4, 2), N.BatchNorm2d(4)],
     lambda: [nn.ConvTranspose2d(3, 4, 2), _torch_bn(2)], (2, 3, 3, 3), ("ptq",)),
    ("bn2d-relu", lambda: [N.BatchNorm2d(3), nn.ReLU()], lambda: [_torch_bn(2, 3), nn.ReLU()],
     (4, 3, 2, 2), ("ptq", "qat")),
    ("bn3d-relu", lambda: [N.BatchNorm3d(3), nn.ReLU()], lambda: [_torch_bn(3, 3), nn.ReLU()],
     (2, 3, 2, 2, 2), ("ptq", "qat")),
    ("conv1d-anyrank-bn", lambda: [_conv(1), N.BatchNorm(4, channel_dim=-2)],
     lambda: [_conv(1), _torch_bn(1)], (4, 3, 5), ("ptq", "qat")),
    ("conv2d-anyrank-bn-relu", lambda: [_conv(2), N.BatchNorm(4), nn.ReLU()],
     lambda: [_conv(2), _torch_bn(2), nn.ReLU()], (4, 3, 4, 3), ("ptq", "qat")),
    ("conv3d-anyrank-bn", lambda: [_conv(3), N.BatchNorm(4, channel_dim=-4)],
     lambda: [_conv(3), _torch_bn(3)], (2, 3, 3, 2, 3), ("ptq", "qat")),
    ("linear-anyrank-bn", lambda: [nn.Linear(3, 4), N.BatchNorm(4, channel_dim=-1)],
     lambda: [nn.Linear(3, 4), _torch_bn(1)], (6, 3), ("ptq", "qat")),
    # a fused activation='relu' is torch's ReLU module
    ("conv2d-bn(relu)", lambda: [_conv(2), N.BatchNorm2d(4, activation="relu")],
     lambda: [_conv(2), _torch_bn(2), nn.ReLU()], (4, 3, 4, 3), ("ptq", "qat")),
    ("conv2d-bn(relu)-relu", lambda: [_conv(2), N.BatchNorm2d(4, activation="relu"), nn.ReLU()],
     lambda: [_conv(2), _torch_bn(2), nn.ReLU()], (4, 3, 4, 3), ("ptq", "qat")),
    # torch has no Linear-BN-ReLU pattern: its reference fuses Linear-BN, then Linear-ReLU
    ("linear-bn(relu)", lambda: [nn.Linear(3, 4), N.BatchNorm1d(4, activation="relu")],
     lambda: [nn.Linear(3, 4), _torch_bn(1), nn.ReLU()], (6, 3), ("ptq",)),
    ("bn2d(relu)-relu", lambda: [N.BatchNorm2d(3, activation="relu"), nn.ReLU()],
     lambda: [_torch_bn(2, 3), nn.ReLU()], (4, 3, 2, 2), ("ptq", "qat")),
    # normlab's defaults that only act in training do not matter for eval fusion; in QAT
    # the fused module trains as torch's (nonfinite='skip' included: see the module doc)
    ("conv2d-bn-cumulative", lambda: [_conv(2), N.BatchNorm2d(4, momentum=None)],
     lambda: [_conv(2), nn.BatchNorm2d(4, momentum=None)], (4, 3, 4, 3), ("ptq", "qat")),
    ("conv2d-bn-nobias-eps", lambda: [_conv(2), N.BatchNorm2d(4, eps=0.1, bias=False)],
     lambda: [_conv(2), nn.BatchNorm2d(4, eps=0.1, bias=False)], (4, 3, 4, 3), ("ptq", "qat")),
    # variants whose eval map is BN's: eval fusion only
    ("conv2d-renorm-relu", lambda: [_conv(2), N.BatchRenorm2d(4), nn.ReLU()],
     lambda: [_conv(2), _torch_bn(2), nn.ReLU()], (4, 3, 4, 3), ("ptq",)),
    ("conv2d-ghost", lambda: [_conv(2), N.GhostBatchNorm2d(4, virtual_batch_size=2)],
     lambda: [_conv(2), _torch_bn(2)], (4, 3, 4, 3), ("ptq",)),
    ("bn2d-ghost-relu", lambda: [N.GhostBatchNorm2d(3, virtual_batch_size=2), nn.ReLU()],
     lambda: [_torch_bn(2, 3), nn.ReLU()], (4, 3, 2, 2), ("ptq",)),
    # a frozen layer is a fixed affine map: folded in eval fusion and in QAT alike
    ("conv2d-frozen-relu", lambda: [_conv(2), N.FrozenBatchNorm2d(4), nn.ReLU()],
     lambda: [_conv(2), _torch_bn(2), nn.ReLU()], (4, 3, 4, 3), ("ptq", "qat")),
    ("linear-frozen(relu)", lambda: [nn.Linear(3, 4), N.FrozenBatchNorm1d(4, activation="relu")],
     lambda: [nn.Linear(3, 4), _torch_bn(1), nn.ReLU()], (6, 3), ("ptq", "qat")),
    ("bn2d-frozen-relu", lambda: [N.FrozenBatchNorm2d(3), nn.ReLU()],
     lambda: [_torch_bn(2, 3), nn.ReLU()], (4, 3, 2, 2), ("ptq",)),
]  # fmt: skip

_FUSION_CASES = [
    pytest.param(ours, theirs, shape, mode, id=f"{name}-{mode}")
    for name, ours, theirs, shape, modes in FUSIONS
    for mode in modes
]


def _fuse(model: nn.Module, mode: str) -> nn.Module:
    names = [name for name, _ in model.named_children()]
    if [type(m) for m in model] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]:
        names = [["0", "1"], ["0", "2"]]  # torch's two steps for what it has no pattern for
    if mode == "ptq":
        return tq.fuse_modules(model, names)
    return tq.fuse_modules_qat(model, names)


@pytest.mark.parametrize("ours, theirs, shape, mode", _FUSION_CASES)
def test_each_pattern_fuses_to_what_torch_builds_from_torch_modules(ours, theirs, shape, mode):
    torch.manual_seed(0)
    a = nn.Sequential(*ours())
    _randomise_bn(a)
    b = nn.Sequential(*theirs())
    _copy_state(a, b)
    frozen = any(isinstance(m, (N.FrozenBatchNorm1d, N.FrozenBatchNorm2d)) for m in a)
    training = mode == "qat"
    a.train(training)
    b.train(training)
    x = _batch(4, n=shape[0], shape=shape[1:])
    with torch.no_grad():
        y_unfused = copy.deepcopy(a)(x)
    fa = _fuse(a, mode)
    # torch's reference: its own fusion of its own modules (a frozen layer is BN's eval
    # map: torch's eval fusion, then back to training mode)
    fb = _fuse(b.eval(), "ptq").train(training) if frozen else _fuse(b, mode)
    assert type(fa[0]) is type(fb[0])
    assert all(isinstance(m, nn.Identity) for m in list(fa)[1:])
    _assert_state_equal(fa[0], fb[0])
    with torch.no_grad():
        ya, yb = fa(x), fb(x)
    assert torch.equal(ya, yb)
    # and the fused module computes what the normlab modules computed (an independent
    # check of the state handed over; QAT fused modules in training use batch statistics)
    torch.testing.assert_close(ya, y_unfused, rtol=1e-5, atol=1e-5)


def test_ptq_folds_the_debiased_statistics_of_ema_debias():
    torch.manual_seed(0)
    conv, bn = _conv(2), N.BatchNorm2d(4, ema_debias=True)
    model = nn.Sequential(conv, bn)
    with torch.no_grad():
        for step in range(3):  # early in training: de-biasing matters
            model(_batch(20 + step, n=4, shape=(3, 4, 3)) * 3 + 2)
    model.eval()
    x = _batch(5, n=4, shape=(3, 4, 3)) * 3 + 2
    with torch.no_grad():
        expected = model(x)
        plain = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(4)).eval()
        plain[1].load_state_dict(bn.state_dict())
        assert not torch.allclose(plain(x), expected, atol=1e-3)  # the raw EMA differs
        fused = tq.fuse_modules(model, ["0", "1"])
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(bn.running_mean, model[1].running_mean)  # stored buffers untouched


# -- refusals -------------------------------------------------------------------------------

REFUSALS = [
    ("silu", lambda: [_conv(2), N.BatchNorm2d(4, activation="silu")], "ptq", r"have only ReLU"),
    ("ema-debias-qat", lambda: [_conv(2), N.BatchNorm2d(4, ema_debias=True)], "qat",
     r"ema_debias=True.*raw EMA"),
    ("nonfinite-raise-qat", lambda: [_conv(2), N.BatchNorm2d(4, nonfinite="raise")], "qat",
     r"nonfinite='raise'.*'propagate'"),
    ("frozen-stats-qat", lambda: [_conv(2), nl.freeze(N.BatchNorm2d(4), affine=False)], "qat",
     r"normlab.freeze.*unfreeze.*freeze_bn_stats"),
    ("renorm-qat", lambda: [_conv(2), N.BatchRenorm2d(4)], "qat", r"training forward"),
    ("ghost-qat", lambda: [_conv(2), N.GhostBatchNorm2d(4, virtual_batch_size=2)], "qat",
     r"training forward"),
    ("channel-last", lambda: [_conv(2), N.BatchNorm(4, channel_dim=-1)], "ptq",
     r"channel_dim=-1 of its 4-D input"),
    ("convT-bn(relu)", lambda: [nn.ConvTranspose2d(3, 4, 2), N.BatchNorm2d(4, activation="relu")],
     "ptq", r"no fused ConvTranspose2d-BN-ReLU"),
    ("linear-bn(relu)-qat", lambda: [nn.Linear(3, 4), N.BatchNorm1d(4, activation="relu")], "qat",
     r"no fused Linear-BN-ReLU module for QAT"),
    ("frozen-relu-qat", lambda: [N.FrozenBatchNorm2d(3), nn.ReLU()], "qat",
     r"fixed affine map.*normlab.fold"),
    ("ghost-untracked", lambda: [N.GhostBatchNorm2d(3, virtual_batch_size=2,
                                                    track_running_stats=False), nn.ReLU()],
     "ptq", r"ghost-batch statistics in eval mode"),
]  # fmt: skip


@pytest.mark.parametrize("modules, mode, match", [pytest.param(*r[1:], id=r[0]) for r in REFUSALS])
def test_what_torch_cannot_reproduce_is_refused_with_the_fix(modules, mode, match):
    model = nn.Sequential(*modules()).train(mode == "qat")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        _fuse(model, mode)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- FX mode -------------------------------------------------------------------------------


def _fx_ptq(model: nn.Module, engine: str, warn_ok: bool) -> tuple[nn.Module, torch.Tensor]:
    model.eval()
    x = _batch(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare_fx(model, tq.get_default_qconfig_mapping(engine), (x,))
    ours = [w for w in caught if w.category is nl.tools.QuantizationFusionWarning]
    assert bool(ours) == warn_ok, [str(w.message) for w in ours]
    for seed in (1, 2):
        prepared(_batch(seed))
    quantized = convert_fx(prepared)
    return quantized, quantized(_batch(3))


def _module_targets(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_fx_ptq_warns_that_normlab_bn_is_not_fused_and_still_runs(engine):
    theirs, ours = _pair()
    q_theirs, _y_theirs = _fx_ptq(theirs, engine, warn_ok=False)
    q_ours, y_ours = _fx_ptq(ours, engine, warn_ok=True)
    assert "bn1" not in _module_targets(q_theirs)  # torch fused BN into the conv
    assert "bn1" in _module_targets(q_ours)  # normlab's stayed, in float
    assert torch.isfinite(y_ours).all()


def test_fx_ptq_after_to_torch_for_quantization_gives_torchs_numbers(engine):
    theirs, ours = _pair()
    converted = nl.to_torch_for_quantization(ours)
    assert not any(type(m).__module__.startswith("normlab") for m in converted.modules())
    assert isinstance(ours.bn1, nl.nn.BatchNorm2d)  # a copy: the model is left alone
    q_theirs, y_theirs = _fx_ptq(theirs, engine, warn_ok=False)
    q_ours, y_ours = _fx_ptq(converted, engine, warn_ok=False)
    assert _module_targets(q_theirs) == _module_targets(q_ours)
    assert torch.equal(y_theirs, y_ours)


def test_fx_qat_after_to_torch_for_quantization_gives_torchs_numbers(engine):
    results = []
    for model in _pair():
        model = nl.to_torch_for_quantization(model.train())
        x = _batch(1)
        prepared = prepare_qat_fx(model, tq.get_default_qat_qconfig_mapping(engine), (x,))
        opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
        losses = []
        for step in range(3):
            loss = prepared(_batch(10 + step)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        quantized = convert_fx(prepared.eval())
        results.append((torch.stack(losses), quantized(_batch(3))))
    (la, ya), (lb, yb) = results
    assert torch.equal(la, lb)
    assert torch.equal(ya, yb)


class Mixed(nn.Module):
    """Every other normlab layer kind, for the conversion: any-rank BN after Conv1d, a fused
    activation, LayerNorm/GroupNorm/InstanceNorm/RMSNorm, a layer used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.bn = N.BatchNorm(4, channel_dim=1, activation="relu")
        self.gn = N.GroupNorm(2, 4, activation="silu")
        self.inorm = N.InstanceNorm1d(4, affine=True)
        self.ln = N.LayerNorm(5)
        self.rms = N.RMSNorm(5)
        self.renorm = N.BatchRenorm1d(4)

    def forward(self, x):  # (N, 3, 5) -> (N, 4, 5)
        x = self.gn(self.bn(self.conv(x)))
        return self.renorm(self.rms(self.ln(self.inorm(x)))) + self.ln(x)


def test_to_torch_for_quantization_converts_every_layer_and_keeps_the_numbers():
    torch.manual_seed(0)
    model = Mixed()
    _randomise_bn(model)
    x = _batch(6, n=6, shape=(3, 5))
    with pytest.raises(ValueError, match=r"pass example_inputs"):
        nl.to_torch_for_quantization(model)
    converted = nl.to_torch_for_quantization(model.eval(), x)
    assert not any(type(m).__module__.startswith("normlab") for m in converted.modules())
    assert isinstance(converted.bn, nn.Sequential)
    assert [type(m) for m in converted.bn] == [nn.BatchNorm1d, nn.ReLU]
    assert type(converted.renorm) is nn.BatchNorm1d  # eval: its eval map is BN's
    assert type(converted.ln) is nn.LayerNorm and type(converted.rms) is nn.RMSNorm
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    # in training mode (the QAT route) a renorm layer is refused: torch's BN trains as BN
    with pytest.raises(ValueError, match=r"BatchRenorm1d 'renorm'.*training forward"):
        nl.to_torch_for_quantization(model.train(), x)


def test_to_torch_for_quantization_in_training_mode_matches_the_normlab_model():
    torch.manual_seed(0)
    model = Mixed()
    model.renorm = nn.Identity()
    model.train()
    _randomise_bn(model)
    # float64: five normalisations over groups of 5 values in a row amplify float32
    # rounding in the input gradient to ~2e-4 relative, in torch's and normlab's alike
    model.double()
    x = _batch(6, n=6, shape=(3, 5)).double()
    converted = nl.to_torch_for_quantization(model, x)
    assert converted.bn[0].training and converted.bn[0].weight is not model.bn.weight  # a copy
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), converted(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    dy = torch.randn(ya.shape, generator=torch.Generator().manual_seed(2), dtype=ya.dtype)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        model.bn.running_var, converted.bn[0].running_var, rtol=1e-12, atol=1e-12
    )


def test_frozen_layer_in_training_mode_must_be_folded_first():
    model = nn.Sequential(_conv(2), N.FrozenBatchNorm2d(4)).train()
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d '1'.*normlab.fold"):
        nl.to_torch_for_quantization(model)
    converted = nl.to_torch_for_quantization(model.eval())
    assert type(converted[1]) is nn.BatchNorm2d and not converted[1].weight.requires_grad
