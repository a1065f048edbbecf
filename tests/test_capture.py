"""fastattr.capture: which parameters are captured, what is recorded, and the refusals.

- ``coverage`` plans Linear / Conv2d (stride, padding incl. 'same'/'valid', dilation, groups,
  bias or not) as fused, GroupNorm / LayerNorm as "groupnorm" / "layernorm", and everything
  else -- reflect-padded or asymmetric convs, Linear / norm subclasses with their own
  forward, MultiheadAttention's out_proj -- as torch.func;
- ``Capture`` records one ``LayerIO`` per call with the output gradient of the per-row sum
  (a shared module gives one record per call), whose per-row gradients sum to autograd's;
- bad inputs raise clear errors naming the culprit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastattr
from fastattr.capture import Capture, NormIO, coverage, make_segments, select_params
from fastattr.psg import Segments
from fastattr.reference import psg as ref


class ConvNet(nn.Module):
    """Odd sizes, every conv geometry the capture handles, a GroupNorm and a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 4, (3, 2), padding=(2, 1), dilation=(2, 1), groups=2, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.c3 = nn.Conv2d(4, 4, 3, padding="same", groups=4)
        self.c4 = nn.Conv2d(4, 5, 1, padding="valid")
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.norm(self.c2(h)))
        h = torch.tanh(self.c4(self.c3(h)))
        return self.head(h.mean(dim=(2, 3)))


class Shared(nn.Module):
    """One Linear called twice on [N, T, d] inputs."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, x):
        return self.mid(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class OwnGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x) * 2


class OwnLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) + 1


def row_sq(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).flatten(1).sum(1)


# ---------------------------------------------------------------------------------- coverage


def test_coverage_conv_geometries_and_fallbacks():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding="same"),          # symmetric 'same' -> fused
        nn.Conv2d(3, 3, 2, padding="same"),          # even kernel: asymmetric -> torch.func
        nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        nn.GroupNorm(1, 3),
        nn.Flatten(),
        OwnForward(3, 2),
        nn.Linear(2, 2, bias=False),
    )
    cov = coverage(model)
    assert cov["0.weight"] == "conv2d" and cov["0.bias"] == "conv2d"
    assert cov["1.weight"] == "torch.func" and "asymmetric" in cov.plans["1.weight"].note
    assert cov["2.weight"] == "torch.func" and "reflect" in cov.plans["2.weight"].note
    assert cov["3.weight"] == "groupnorm" and cov["3.bias"] == "groupnorm"
    assert cov["5.weight"] == "torch.func" and "overrides" in cov.plans["5.weight"].note
    assert cov["6.weight"] == "linear"
    assert list(cov) == [n for n, _ in model.named_parameters()]
    offsets = cov.offsets()
    assert offsets["0.bias"] == 2 * 3 * 9 and cov.num_features == sum(
        p.numel() for p in model.parameters())
    text = str(cov)
    for name in cov:
        assert name in text
    assert "conv2d:" in text and "torch.func:" in text and "linear:" in text
    assert "groupnorm:" in text
    assert "Coverage(" in repr(cov)


def test_coverage_norms():
    model = nn.ModuleDict({
        "gn": nn.GroupNorm(2, 4), "ln": nn.LayerNorm((3, 4)), "own_gn": OwnGroupNorm(2, 4),
        "own_ln": OwnLayerNorm(4), "plain_ln": nn.LayerNorm(4, elementwise_affine=False)})
    cov = coverage(model)
    assert [cov[f"{m}.{r}"] for m in ("gn", "ln") for r in ("weight", "bias")] == [
        "groupnorm", "groupnorm", "layernorm", "layernorm"]
    assert cov["own_gn.weight"] == "torch.func"
    assert "overrides GroupNorm.forward" in cov.plans["own_gn.weight"].note
    assert cov["own_ln.bias"] == "torch.func"
    assert "overrides LayerNorm.forward" in cov.plans["own_ln.bias"].note
    assert not any(n.startswith("plain_ln") for n in cov)


def test_coverage_multihead_attention_out_proj_is_not_fused():
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    cov = coverage(mha)
    assert cov["out_proj.weight"] == "torch.func"
    assert "MultiheadAttention" in cov.plans["out_proj.weight"].note
    assert cov["in_proj_weight"] == "torch.func"


def test_select_params_filters():
    model = Shared()
    assert list(select_params(model)) == ["inp.weight", "inp.bias", "mid.weight", "mid.bias"]
    assert list(select_params(model, lambda n, p: n.endswith("bias"))) == ["inp.bias", "mid.bias"]
    # a list keeps named_parameters order, whatever order it is given in
    assert list(select_params(model, ["mid.weight", "inp.bias"])) == ["inp.bias", "mid.weight"]
    model.inp.requires_grad_(False)
    assert list(select_params(model)) == ["mid.weight", "mid.bias"]
    with pytest.raises(ValueError, match="no parameter selected"):
        select_params(model, lambda n, p: False)
    with pytest.raises(ValueError, match="no parameter selected"):
        select_params(model, [])
    with pytest.raises(ValueError, match="unknown parameter names"):
        select_params(model, ["mid.weight", "nope"])
    with pytest.raises(TypeError, match="list"):
        select_params(model, "mid.weight")


def test_make_segments():
    seg = make_segments(None, 4)
    assert seg.num_segments == 4 and seg.num_rows == 4
    seg = make_segments([1, 1, 0, 2], 4)
    assert seg.num_segments == 3
    with pytest.raises(ValueError, match="3 sample ids but output_fn returned 4 rows"):
        make_segments([0, 0, 1], 4)
    with pytest.raises(ValueError, match="describe 5 rows"):
        make_segments(Segments.identity(5), 4)


# ----------------------------------------------------------------------------------- records


def grads_from_records(cap: Capture, n: int) -> dict:
    """Batch-summed parameter gradients rebuilt from the records (reference ops)."""
    seg = Segments.from_ids(torch.zeros(n, dtype=torch.int64))  # all rows in one sample
    params = dict(cap.model.named_parameters())
    out = {}
    for mname, calls in cap.layers.items():
        roles = cap.roles[mname]
        for layer in calls:
            if isinstance(layer, NormIO):
                w, b = layer.row_grads("weight" in roles, "bias" in roles)
                for role, rows in (("weight", w), ("bias", b)):
                    if rows is not None:
                        out[roles[role]] = out.get(roles[role], 0) + rows.sum(0)
                continue
            w, b = ref.per_sample_grads(layer.a, layer.g, seg.seg_ptr, seg.order, layer.conv,
                                        "bias" in roles)
            if "weight" in roles:
                name = roles["weight"]
                out[name] = out.get(name, 0) + w[0].reshape(params[name].shape)
            if "bias" in roles:
                name = roles["bias"]
                out[name] = out.get(name, 0) + b[0]
    return out


class Norms(nn.Module):
    """GroupNorm on [N, C, L] and LayerNorm over the last 1 and 2 dims of [N, T, d]."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.gn = nn.GroupNorm(2, 4, eps=1e-3)
        self.ln1 = nn.LayerNorm(6)
        self.ln2 = nn.LayerNorm((4, 6))

    def forward(self, x):
        h = torch.tanh(self.inp(x))                         # [N, 4, 6]
        h = self.gn(h) + self.ln1(h).pow(2)
        return self.ln2(h.sin())


@pytest.mark.parametrize("factory,shape", [
    (ConvNet, (5, 3, 9, 7)),
    (Shared, (6, 3, 5)),
    (Norms, (5, 4, 5)),
])
def test_records_rebuild_autograd_gradients(factory, shape):
    model = factory()
    x = torch.randn(shape)
    y = torch.randn_like(model(x))
    expected = torch.autograd.grad(row_sq(model, (x, y)).sum(), list(model.parameters()))
    expected = dict(zip([n for n, _ in model.named_parameters()], expected))
    with Capture(model) as cap:
        cap.backward(row_sq(model, (x, y)))
    assert cap.num_rows == shape[0]
    got = grads_from_records(cap, shape[0])
    for name, method in cap.plan.items():
        if method == "torch.func":
            assert name not in got
            continue
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in model.parameters()), "capture must not write .grad"


def test_shared_module_gives_one_record_per_call_and_linear_layout():
    model = Shared()
    x = torch.randn(6, 3, 5)
    with Capture(model) as cap:
        cap.backward(model(x).pow(2).flatten(1).sum(1))
    assert [len(cap.layers[m]) for m in ("inp", "mid")] == [1, 2]
    first, second = cap.layers["mid"]
    assert first.a.shape == (6, 3, 4) and first.g.shape == (6, 3, 4) and first.conv == ()
    # the second call's input is tanh of the first call's output
    assert not torch.equal(first.a, second.a)


def test_conv_geometry_tuple():
    model = ConvNet()
    x = torch.randn(2, 3, 9, 7)
    with Capture(model) as cap:
        cap.backward(model(x).sum(1))
    assert cap.layers["c1"][0].conv == (3, 3, 2, 2, 1, 1, 1, 1, 1)
    assert cap.layers["c2"][0].conv == (3, 2, 1, 1, 2, 1, 2, 1, 2)
    assert cap.layers["c3"][0].conv == (3, 3, 1, 1, 1, 1, 1, 1, 4)  # 'same'
    assert cap.layers["c4"][0].conv == (1, 1, 1, 1, 0, 0, 1, 1, 1)  # 'valid'
    norm = cap.layers["norm"][0]
    assert isinstance(norm, NormIO) and norm.kind == "groupnorm" and norm.shape == (2,)
    assert norm.x.shape == norm.g.shape == (2, 4, 5, 5) and norm.eps == 1e-5


def test_output_modified_in_place_still_gives_its_gradient():
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 4)

    def fwd(m):
        h = m(x)
        h.mul_(3.0)  # in place on the captured output
        return h.pow(2).sum(1)

    expected = torch.autograd.grad(fwd(lin).sum(), [lin.weight])[0]
    with Capture(lin) as cap:
        cap.backward(fwd(lin))
    got = grads_from_records(cap, 5)["weight"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_on_layer_callback_and_frozen_selection_restored():
    model = Shared()
    model.requires_grad_(False)
    seen = []
    x = torch.randn(4, 2, 5)
    with Capture(model, ["mid.weight"], on_layer=lambda m, layer: seen.append((m, layer))) as cap:
        assert model.mid.weight.requires_grad  # switched on for the capture
        cap.backward(model(x).sum(dim=(1, 2)))
    assert not model.mid.weight.requires_grad
    assert [m for m, _ in seen] == ["mid", "mid"] and cap.layers == {}
    assert cap.roles == {"mid": {"weight": "mid.weight"}}


# ------------------------------------------------------------------------------------ errors


def test_scalar_output_is_refused():
    model = Shared()
    x = torch.randn(4, 2, 5)
    with Capture(model) as cap:
        with pytest.raises(ValueError, match="per-row values"):
            cap.backward(model(x).pow(2).mean())
    with Capture(model) as cap:
        with pytest.raises(ValueError, match=r"shape \[N\]"):
            cap.backward(model(x).sum(2))


def test_batchnorm_train_is_refused_eval_is_fine():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match=r"module 1 \(BatchNorm2d\).*batch statistics"):
        with Capture(model):
            pass
    model.eval()
    with Capture(model) as cap:
        cap.backward(model(torch.randn(3, 2, 5, 5)).sum(1))
    assert set(cap.layers) == {"0", "3"}


def test_leading_dim_not_rows_is_refused_naming_the_module():
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            # rows folded into the token dim: the rows are no longer the leading dim
            return self.proj(x.reshape(1, -1, 4)).reshape(x.shape)

    model = Folded()
    with Capture(model) as cap:
        out = model(torch.randn(3, 2, 4)).sum(dim=(1, 2))
        with pytest.raises(ValueError, match=r"module proj \(Linear\).*N=3"):
            cap.backward(out)


def test_parameter_used_without_calling_its_module_is_refused():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.lin.weight)

    model = Functional()
    with Capture(model, ["lin.weight"]) as cap:
        with pytest.raises(ValueError, match="module lin was never called"):
            cap.backward(model(torch.randn(2, 3)).sum(1))
    # an unused module is fine (its gradient is zero)
    unused = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    with Capture(unused) as cap:
        cap.backward(unused["a"](torch.randn(2, 3)).sum(1))
    assert set(cap.layers) == {"a"}


def test_norm_used_without_calling_it_falls_back():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.gn = nn.GroupNorm(2, 4)
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            h = torch.nn.functional.group_norm(self.lin(x), 2, self.gn.weight, self.gn.bias)
            return self.ln(h)

    model = Functional()
    with Capture(model) as cap:
        cap.backward(model(torch.randn(3, 3)).pow(2).sum(1))
    assert cap.fallback == ["gn.weight", "gn.bias"]
    assert set(cap.layers) == {"lin", "ln"}


def test_capture_is_single_use():
    model = Shared()
    cap = Capture(model)
    with cap:
        cap.backward(model(torch.randn(2, 1, 5)).sum(dim=(1, 2)))
        with pytest.raises(RuntimeError, match="once"):
            cap.backward(model(torch.randn(2, 1, 5)).sum(dim=(1, 2)))
    with pytest.raises(RuntimeError, match="entered once"):
        with cap:
            pass
    # hooks are gone after the block
    assert not model.inp._forward_hooks


def test_exports():
    assert fastattr.Capture is Capture and fastattr.coverage is coverage


def test_non_reentrant_checkpointing_is_captured():
    """The output hooks sit on the original graph; the recomputation inside the backward
    is not recorded a second time."""
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            h = checkpoint(lambda h: torch.tanh(self.b(h)), h, use_reentrant=False)
            return self.c(h)

    model = Ckpt()
    x = torch.randn(5, 4)
    expected = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()))
    with Capture(model) as cap:
        cap.backward(model(x).pow(2).sum(1))
    assert [len(cap.layers[m]) for m in ("a", "b", "c")] == [1, 1, 1]
    got = grads_from_records(cap, 5)
    for (name, _), exp in zip(model.named_parameters(), expected):
        torch.testing.assert_close(got[name], exp, rtol=1e-5, atol=1e-6)


def test_backward_keeps_only_the_lowest_outputs_as_targets():
    """``_lowest`` picks the captured outputs with no other captured output below them:
    parallel branches both stay, a layer fed by another is dropped, an output the loss does
    not use stays (it is unreached); the backward through them still records every call."""
    from fastattr.capture import _lowest

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(4, 5)
            self.c, self.unused = nn.Linear(5, 3), nn.Linear(4, 2)

        def forward(self, x):
            self.unused(x)
            return self.c(torch.tanh(self.a(x)) * self.b(x))

    model = Branches()
    x = torch.randn(6, 4)
    outs = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in ("a", "b", "c", "unused")]
    loss = model(x).pow(2).sum()
    for h in hooks:
        h.remove()
    lowest = _lowest(loss.grad_fn, [outs[n] for n in ("c", "a", "b", "unused")])
    assert [id(t) for t in lowest] == [id(outs[n]) for n in ("a", "b", "unused")]
    assert _lowest(None, [outs["c"]]) == [outs["c"]]  # no graph walked: kept

    expected = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()),
                                   allow_unused=True)
    with Capture(model) as cap:
        cap.backward(model(x).pow(2).sum(1))
    assert [len(cap.layers.get(m, [])) for m in ("a", "b", "c", "unused")] == [1, 1, 1, 0]
    got = grads_from_records(cap, 6)
    for (name, _), exp in zip(model.named_parameters(), expected):
        if exp is not None:
            torch.testing.assert_close(got[name], exp, rtol=1e-5, atol=1e-6)
