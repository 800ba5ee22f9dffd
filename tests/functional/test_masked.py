"""Masked (variable-length) normalization: padded positions count for nothing.

References are independent of normlab: torch's own ``batch_norm`` / ``BatchNorm1d`` run in
float64 on the valid positions gathered out of the padded batch (so padding is dropped,
not masked), and per-slice float64 loops for the per-sample norms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normlab as nl
import normlab.functional as NF

EPS = 1e-5


def _lengths_mask(lengths, L):
    return torch.arange(L)[None, :] < torch.as_tensor(lengths)[:, None]


def _sequence_batch(seed, N=4, L=6, C=3, lengths=(6, 2, 4, 1), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (2.0 + 3.0 * torch.randn(N, L, C, generator=g)).to(dtype)
    m = _lengths_mask(lengths, L)
    x[~m] = float("nan")  # garbage in the padding must not matter
    dy = torch.randn(N, L, C, generator=g).to(dtype)
    return x, m, dy


def _params(C, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + seed)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(dtype).requires_grad_()
    b = (0.3 * torch.randn(C, generator=g)).to(dtype).requires_grad_()
    return w, b


# -- BatchNorm: (N, L, C) with channel_dim=-1, and (N, C, L) with BatchNorm1d ---------------


@pytest.mark.parametrize("layout", ["NLC", "NCL"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_sequence_batch_norm_equals_torch_on_the_valid_positions(layout, momentum):
    C = 3
    if layout == "NLC":
        layer = nl.nn.BatchNorm(C, momentum=momentum, channel_dim=-1, dtype=torch.float64)
    else:
        layer = nl.nn.BatchNorm1d(C, momentum=momentum, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(C, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        for p, q in ((layer.weight, ref.weight), (layer.bias, ref.bias)):
            w, b = _params(C)
            p.copy_(w if p is layer.weight else b)
            q.copy_(p)
    for step, lengths in enumerate([(6, 2, 4, 1), (3, 3, 6, 2), (1, 1, 5, 6)]):
        x, m, dy = _sequence_batch(step, lengths=lengths)
        xin = (x.clone() if layout == "NLC" else x.transpose(1, 2).contiguous()).requires_grad_()
        y = layer(xin, mask=m)
        y_nlc = y if layout == "NLC" else y.transpose(1, 2)
        (y_nlc[m] * dy[m]).sum().backward()
        v = x[m].clone().requires_grad_()  # (K, C): the valid positions only
        y_ref = ref(v)
        (y_ref * dy[m]).sum().backward()
        torch.testing.assert_close(y_nlc[m], y_ref.detach(), rtol=1e-10, atol=1e-10)
        gx = xin.grad if layout == "NLC" else xin.grad.transpose(1, 2)
        torch.testing.assert_close(gx[m], v.grad, rtol=1e-9, atol=1e-10)
        assert (gx[~m] == 0).all()  # no gradient into padding (and no NaN from it)
        for p, q in ((layer.weight, ref.weight), (layer.bias, ref.bias)):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10)
            p.grad = q.grad = None
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=0)
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1


def test_padded_outputs_are_the_normalised_value_and_do_not_feed_gradients():
    x, m, _ = _sequence_batch(1)
    x = torch.nan_to_num(x, nan=7.0)
    w, b = _params(3)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = NF.batch_norm(x, rm, rv, w, b, True, channel_dim=-1, mask=m)
    v = x[m]
    mean, var = v.mean(0), v.var(0, unbiased=False)
    expect = (x - mean) / torch.sqrt(var + EPS) * w + b
    torch.testing.assert_close(y, expect.detach(), rtol=1e-10, atol=1e-10)
    # the loss on the padded outputs only: no gradient anywhere
    y2 = NF.batch_norm(x.requires_grad_(), None, None, w, b, True, channel_dim=-1, mask=m)
    gx, gw, gb = torch.autograd.grad(y2[~m].sum(), (x, w, b), allow_unused=True)
    for g in (gx, gw, gb):
        assert g is None or (g == 0).all()


def test_all_true_mask_equals_no_mask_exactly():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 7, generator=g)
    ones = torch.ones(5, 7, dtype=torch.bool)
    a, b = nl.nn.BatchNorm1d(4), nl.nn.BatchNorm1d(4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa, mask=ones), b(xb)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(a.weight.grad, b.weight.grad)
    assert torch.equal(a.running_var, b.running_var)
    x4 = torch.randn(2, 6, 3, 5, generator=g)
    m4 = torch.ones(2, 3, 5, dtype=torch.bool)
    assert torch.equal(NF.group_norm(x4, 3, mask=m4), NF.group_norm(x4, 3))
    assert torch.equal(NF.instance_norm(x4, mask=m4), NF.instance_norm(x4))
    assert torch.equal(NF.layer_norm(x4, (6, 3, 5), mask=m4[:, None]), NF.layer_norm(x4, (6, 3, 5)))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64).requires_grad_()
    m = _lengths_mask([4, 1, 2], 4)
    w, b = _params(2)

    def bn(x, w, b):
        return NF.batch_norm(x, None, None, w, b, True, channel_dim=-1, mask=m)[m]

    assert torch.autograd.gradcheck(bn, (x, w, b))
    assert torch.autograd.gradgradcheck(bn, (x, w, b))
    x2 = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    m2 = _lengths_mask([5, 2, 3], 5)
    w2, b2 = _params(4)
    mm = m2[:, None, :].expand(3, 4, 5)
    assert torch.autograd.gradcheck(lambda *a: NF.group_norm(*a[:1], 2, *a[1:], mask=m2)[mm],
                                    (x2, w2, b2))  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda x, w, b: NF.instance_norm(x, None, None, w, b, mask=m2)[mm], (x2, w2, b2)
    )


# -- per-sample norms ------------------------------------------------------------------


def _image_batch(seed=5, N=3, C=4, H=3, W=4):
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + 2.0 * torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    m = torch.rand(N, H, W, generator=g) < 0.6
    m[0] = True
    m[1, 0, 0] = True  # every sample counts something
    return x, m


def test_group_norm_instance_norm_and_layer_norm_against_slice_loops():
    x, m = _image_batch()
    N, C = x.shape[:2]
    w, b = _params(C)
    G = 2
    y = nl.nn.GroupNorm(G, C, dtype=torch.float64)
    with torch.no_grad():
        y.weight.copy_(w)
        y.bias.copy_(b)
    out = y(x, mask=m)
    inorm = NF.instance_norm(x, None, None, w, b, mask=m)
    lnorm = NF.layer_norm(x, (C, *x.shape[2:]), mask=m[:, None])
    for n in range(N):
        mk = m[n]
        for gi in range(G):
            cs = slice(gi * C // G, (gi + 1) * C // G)
            v = x[n, cs][:, mk]
            z = (x[n, cs] - v.mean()) / torch.sqrt(v.var(unbiased=False) + EPS)
            z = z * w[cs, None, None] + b[cs, None, None]
            torch.testing.assert_close(out[n, cs], z.detach(), rtol=1e-10, atol=1e-10)
        for c in range(C):
            v = x[n, c][mk]
            z = (x[n, c] - v.mean()) / torch.sqrt(v.var(unbiased=False) + EPS) * w[c] + b[c]
            torch.testing.assert_close(inorm[n, c], z.detach(), rtol=1e-10, atol=1e-10)
        v = x[n][:, mk]
        z = (x[n] - v.mean()) / torch.sqrt(v.var(unbiased=False) + EPS)
        torch.testing.assert_close(lnorm[n], z, rtol=1e-10, atol=1e-10)


def test_instance_norm_running_statistics_average_the_instances_with_a_variance():
    x, m = _image_batch(6)
    m[2] = False
    m[2, 1, 1] = True  # one counted position: no variance, left out of the running update
    layer = nl.nn.InstanceNorm2d(4, track_running_stats=True, dtype=torch.float64)
    layer(x, mask=m)
    means = torch.stack([x[n][:, m[n]].mean(1) for n in (0, 1)]).mean(0)
    vars_ = torch.stack([x[n][:, m[n]].var(1) for n in (0, 1)]).mean(0)
    torch.testing.assert_close(layer.running_mean, 0.1 * means, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * vars_, rtol=1e-12, atol=0)


def test_layer_norm_token_mask_only_stops_gradients():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    m = _lengths_mask([5, 3], 5)
    ln = nl.nn.LayerNorm(8, dtype=torch.float64)
    y = ln(x, mask=m)
    torch.testing.assert_close(y, F.layer_norm(x, (8,), ln.weight, ln.bias))
    y.sum().backward()
    assert (x.grad[~m] == 0).all() and x.grad[m].abs().sum() > 0


def test_sample_with_no_counted_position_is_finite():
    x, m = _image_batch(8)
    m[1] = False
    x.requires_grad_()
    y = NF.group_norm(x, 2, mask=m)
    expect = x[1].detach() / (1 + EPS) ** 0.5  # mean 0, variance 1, γ = 1, β = 0
    torch.testing.assert_close(y[1], expect)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()


# -- errors ----------------------------------------------------------------------------


def test_bad_masks_get_clear_errors():
    bn = nl.nn.BatchNorm1d(3)
    x = torch.randn(4, 3, 6)
    with pytest.raises(ValueError, match=r"expected \(4, 6\)"):
        bn(x, mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        bn(x, mask=torch.ones(4, 6))
    with pytest.raises(ValueError, match=r"expected \(4, 5\)"):
        NF.group_norm(torch.randn(4, 2, 5), 1, mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="not supported"):
        nl.nn.BatchRenorm1d(3)(x, mask=torch.ones(4, 6, dtype=torch.bool))


def test_eval_mode_mask_changes_no_output_and_stops_gradients():
    bn = nl.nn.BatchNorm1d(3)
    bn(torch.randn(8, 3, 5))
    bn.eval()
    x = torch.randn(4, 3, 6, requires_grad=True)
    m = _lengths_mask([6, 2, 3, 1], 6)
    y = bn(x, mask=m)
    assert torch.equal(y, bn(x))
    y.sum().backward()
    assert (x.grad.transpose(1, 2)[~m] == 0).all()


# -- degenerate counts -----------------------------------------------------------------


def test_degenerate_error_is_the_default_with_and_without_mask():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nl.nn.BatchNorm1d(3)(torch.randn(1, 3))
    m = _lengths_mask([1, 0], 4)
    with pytest.raises(ValueError, match="the mask leaves 1"):
        nl.nn.BatchNorm1d(3)(torch.randn(2, 3, 4), mask=m)
    with pytest.raises(ValueError, match="degenerate must be one of"):
        nl.nn.BatchNorm1d(3, degenerate="ignore")
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nl.nn.BatchNorm1d(3, degenerate="eval", track_running_stats=False)
    with pytest.raises(ValueError, match=r"there are none"):
        NF.batch_norm(torch.randn(1, 3), None, None, training=True, degenerate="eval")


def _trained(cls, degenerate, **kw):
    layer = cls(3, degenerate=degenerate, **kw).double()
    layer(torch.randn(16, 3, dtype=torch.float64) * 2 + 1)
    return layer


@pytest.mark.parametrize(
    "cls,kw,masked",
    [
        (nl.nn.BatchNorm1d, {}, False),
        (nl.nn.BatchNorm1d, {}, True),
        (nl.nn.BatchRenorm1d, {}, False),
        (nl.nn.GhostBatchNorm1d, {"virtual_batch_size": 4}, False),
    ],
)
def test_degenerate_eval_is_eval_mode_and_keeps_the_state(cls, kw, masked):
    layer = _trained(cls, "eval", **kw)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    g = torch.Generator().manual_seed(9)
    if masked:
        x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
        m = _lengths_mask([1, 0], 4)
        y = layer(x, mask=m)
    else:
        x = torch.randn(1, 3, generator=g, dtype=torch.float64, requires_grad=True)
        y = layer(x)
    ref = torch.nn.BatchNorm1d(3).double().eval()
    ref.load_state_dict(state)
    xr = x.detach().clone().requires_grad_()
    yr = ref(xr)
    torch.testing.assert_close(y, yr.detach(), rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    if masked:
        dy = dy * m[:, None, :]
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    "cls,kw",
    [
        (nl.nn.BatchNorm1d, {}),
        (nl.nn.BatchRenorm1d, {}),
        (nl.nn.GhostBatchNorm1d, {"virtual_batch_size": 4}),
    ],
)
def test_degenerate_skip_passes_the_raw_input_through(cls, kw):
    layer = _trained(cls, "skip", **kw)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, x)
    dy = torch.randn(1, 3, dtype=torch.float64)
    (y * dy).sum().backward()
    assert torch.equal(x.grad, dy)
    assert (layer.weight.grad == 0).all() and (layer.bias.grad == 0).all()
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_degenerate_skip_with_mask_keeps_state_and_stops_padded_gradients():
    layer = nl.nn.BatchNorm(3, channel_dim=-1, degenerate="skip")
    x = torch.randn(2, 4, 3, requires_grad=True)
    m = _lengths_mask([0, 1], 4)
    y = layer(x, mask=m)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, m[..., None].expand(2, 4, 3).float())
    assert int(layer.num_batches_tracked) == 0 and (layer.running_mean == 0).all()


# -- torch.compile ---------------------------------------------------------------------


def _compiled(layer):
    torch._dynamo.reset()
    return torch.compile(layer, backend="aot_eager", fullgraph=True)


@pytest.mark.slow
def test_compiled_mask_matches_eager_over_steps():
    eager = nl.nn.BatchNorm(3, channel_dim=-1, momentum=None, dtype=torch.float64)
    comp = nl.nn.BatchNorm(3, channel_dim=-1, momentum=None, dtype=torch.float64)
    f = _compiled(comp)
    for step, lengths in enumerate([(6, 2, 4, 1), (3, 3, 6, 2)]):
        x, m, dy = _sequence_batch(step, lengths=lengths)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa, mask=m), f(xb, mask=m)
        torch.testing.assert_close(yb[m], ya[m], rtol=1e-10, atol=1e-10)
        (ya[m] * dy[m]).sum().backward()
        (yb[m] * dy[m]).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(comp.running_var, eager.running_var, rtol=1e-12, atol=0)
        assert int(comp.num_batches_tracked) == int(eager.num_batches_tracked)


@pytest.mark.slow
@pytest.mark.parametrize("degenerate", ["eval", "skip"])
def test_compiled_masked_degenerate_is_branch_free(degenerate):
    layer = nl.nn.BatchNorm(3, channel_dim=-1, degenerate=degenerate, dtype=torch.float64)
    layer(torch.randn(8, 5, 3, dtype=torch.float64) + 1)
    eager_ref = nl.nn.BatchNorm(3, channel_dim=-1, degenerate=degenerate, dtype=torch.float64)
    eager_ref.load_state_dict(layer.state_dict())
    f = _compiled(layer)
    x, _, _ = _sequence_batch(2)
    x = torch.nan_to_num(x, nan=0.5)
    for lengths in [(1, 0, 0, 0), (6, 2, 4, 1)]:  # the same graph: degenerate, then not
        m = _lengths_mask(lengths, 6)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        y = f(x, mask=m)
        y_ref = eager_ref(x, mask=m)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        if sum(lengths) <= 1:
            for k, v in layer.state_dict().items():
                assert torch.equal(v, before[k]), k
        torch.testing.assert_close(layer.running_mean, eager_ref.running_mean)
        assert int(layer.num_batches_tracked) == int(eager_ref.num_batches_tracked)


@pytest.mark.slow
def test_compiled_masked_degenerate_error_asserts_and_static_counts_branch():
    f = _compiled(nl.nn.BatchNorm(3, channel_dim=-1))
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        f(torch.randn(2, 4, 3), mask=_lengths_mask([1, 0], 4))
    layer = nl.nn.BatchNorm1d(3, degenerate="skip")
    g = _compiled(layer)
    x = torch.randn(1, 3)
    assert torch.equal(g(x), x) and int(layer.num_batches_tracked) == 0


def test_vmap_over_sequences_with_masks():
    # torch.func takes the traced path: per-example masked statistics, branch-free
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 6, 2, generator=g, dtype=torch.float64)  # (B, N, L, C)
    m = torch.rand(3, 4, 6, generator=g) < 0.7
    m[:, 0, :2] = True
    w, b = _params(2)

    def f(x, m):
        return NF.batch_norm(x, None, None, w, b, True, channel_dim=-1, mask=m)

    y = torch.func.vmap(f)(x, m)
    for i in range(3):
        torch.testing.assert_close(y[i][m[i]], f(x[i], m[i])[m[i]].detach(), rtol=1e-10, atol=1e-10)
