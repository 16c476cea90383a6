"""Output errors of separate layer perturbations from one backward pass (recon.sensitivity)."""

import copy
import math

import pytest
import torch
from torch import nn

from recon.profile import _flat_output
from recon.sensitivity import linearised_output_errors


def _net(inplace: bool, outputs: int = 1, relu: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    act = nn.ReLU(inplace=inplace) if relu else nn.Identity()
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        act,
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, outputs),
    ).eval()


def _scaled(by: float):
    return lambda x, y: (by * y, y)  # δ = by · (the module's output)


def _perturbed_error(net: nn.Module, x: torch.Tensor, name: str, delta) -> float:
    """‖f' − f‖² / ‖f‖² with ``delta`` added to module ``name``'s output: by running it."""
    ref = net(x).detach()
    h = net.get_submodule(name).register_forward_hook(lambda m, i, y: y + delta(i[0], y)[0])
    try:
        out = net(x).detach()
    finally:
        h.remove()
    return float((out - ref).double().square().sum() / ref.double().square().sum())


def test_a_linear_network_with_one_output_gives_the_exact_output_errors():
    net = _net(False, relu=False)
    x = torch.randn(10, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    perturb = {"first": [("0", _scaled(0.1))], "second": [("2", _scaled(-0.3))]}
    errors, layer, images = linearised_output_errors(net, perturb, [x[:6], x[6:]], _flat_output)
    assert images == 10
    assert layer == pytest.approx({"first": 0.1**2, "second": 0.3**2}, rel=1e-6)
    assert errors["first"] == pytest.approx(_perturbed_error(net, x, "0", _scaled(0.1)), rel=1e-5)
    assert errors["second"] == pytest.approx(_perturbed_error(net, x, "2", _scaled(-0.3)), rel=1e-5)


def test_a_key_perturbing_two_modules_measures_them_together():
    net = _net(False, relu=False)
    x = torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    d0 = lambda x_in, y: (torch.full_like(y, 0.1), y)  # noqa: E731 (constant: exactly linear)
    d2 = lambda x_in, y: (torch.full_like(y, -0.05), None)  # noqa: E731
    errors, _, _ = linearised_output_errors(
        net, {"both": [("0", d0), ("2", d2)]}, [x], _flat_output
    )
    ref = net(x).detach()
    hooks = [net[0].register_forward_hook(lambda m, i, y: y + d0(i, y)[0])]
    hooks.append(net[2].register_forward_hook(lambda m, i, y: y + d2(i, y)[0]))
    out = net(x).detach()
    for h in hooks:
        h.remove()
    exact = float((out - ref).double().square().sum() / ref.double().square().sum())
    assert errors["both"] == pytest.approx(exact, rel=1e-5)
    alone = [_perturbed_error(net, x, n, d) for n, d in (("0", d0), ("2", d2))]
    assert exact != pytest.approx(sum(alone), rel=1e-2)  # the two changes interfere


@pytest.mark.parametrize("inplace", [False, True])
def test_through_an_in_place_relu_it_is_the_first_order_change(inplace):
    net = _net(inplace)
    x = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(3))
    delta = lambda x_in, y: (1e-3 * torch.sin(y), None)  # noqa: E731 (a small, uneven change)
    errors, _, _ = linearised_output_errors(net, {"u": [("0", delta)]}, [x], _flat_output)
    # ∂f/∂z of module 0's output z, by brute force, one image at a time
    first_order, ref_sq = 0.0, 0.0
    for img in x:
        z = net[0](img[None]).detach().requires_grad_(True)
        rest = copy.deepcopy(net[1:])
        rest[0].inplace = False
        f = rest(z)
        (g,) = torch.autograd.grad(f.sum(), z)
        first_order += float((g * delta(None, z.detach())[0]).sum()) ** 2
        ref_sq += float(f.detach().square().sum())
    assert errors["u"] == pytest.approx(first_order / ref_sq, rel=1e-4)


def test_leaves_the_model_as_it_was():
    net = _net(True)
    before = copy.deepcopy(net.state_dict())
    linearised_output_errors(
        net, {"u": [("0", _scaled(0.1))]}, [torch.randn(4, 2, 5, 5)], _flat_output
    )
    assert all(p.grad is None for p in net.parameters())
    assert not any(m.training for m in net.modules())
    assert not net[0]._forward_hooks
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_first_images_only_and_the_same_signs_however_the_images_are_split():
    net = _net(False, outputs=3)
    x = torch.randn(12, 2, 5, 5, generator=torch.Generator().manual_seed(4))
    perturb = {"u": [("2", lambda x_in, y: (torch.cos(y), y))]}
    seen = []

    def total(batches, offsets):
        def add(ts):
            seen.append([t.clone() for t in ts])
            return ts

        return linearised_output_errors(
            net, perturb, batches, _flat_output, offsets=offsets, images=8, seed=5, reduce=add
        )

    whole, _, n = total([x], [0])
    assert n == 8
    seen.clear()
    total([x[:5]], [0]), total([x[5:]], [5])  # two processes' shares
    err, out_sq, count, _ = (a + b for a, b in zip(*seen, strict=True))
    assert int(count) == 8
    assert whole["u"] == pytest.approx(float(err[0] / out_sq), rel=1e-5)  # float32 batches


def test_with_many_outputs_the_estimate_is_near_the_exact_value():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 6)).eval()
    x = torch.randn(2000, 5)
    errors, _, _ = linearised_output_errors(
        net, {"u": [("0", _scaled(0.1))]}, [x], _flat_output, images=2000
    )
    assert errors["u"] == pytest.approx(_perturbed_error(net, x, "0", _scaled(0.1)), rel=0.1)


# ---------------------------------------------------------------- the profile's perturbations


class _Grouped(nn.Module):
    """stem -> grouped conv (2 groups) -> pool -> linear: a grouped and a linear consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        x = torch.relu(self.mid(torch.relu(self.stem(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 3).flatten(1))


def _models():
    from test_concat import TinyDense, TinyFire

    from recon import models

    torch.manual_seed(0)
    return {
        "grouped": _Grouped(),
        "resnet": models.cifar_resnet20(width=0.25, num_classes=3),
        "fire": TinyFire(),
        "dense": TinyDense(),
    }


def _half(unit) -> torch.Tensor:
    """Every other channel, the same number from each group of the consumer (and of the
    producer's groups)."""
    g = math.lcm(unit.groups, unit.producer_groups)
    per = unit.width // g
    return torch.tensor([j * per + i for j in range(g) for i in range(0, per, 2)])


@pytest.mark.parametrize("name", ["grouped", "resnet", "fire", "dense"])
def test_each_units_perturbation_is_what_pruning_it_changes(name):
    from nets import randomize_bn

    from recon.graph import find_units, trace
    from recon.layers import SampledConv2d
    from recon.profile import _consumer_delta
    from recon.surgery import channel_offset, prune_unit

    net = randomize_bn(_models()[name]).eval()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    units = find_units(net, trace(net)).units
    assert units
    for unit in units:
        keep = _half(unit)
        readers = (unit, *unit.readers)
        biases = [  # (without a bias of its own, the change goes into the BatchNorm after)
            torch.randn(m.weight.shape[0], dtype=torch.float64) if m.bias is not None else None
            for m in (net.get_submodule(r.consumer) for r in readers)
        ]
        pruned = copy.deepcopy(net)
        prune_unit(pruned, unit, keep, bias_delta=biases if unit.readers else biases[0])
        for r, beta in zip(readers, biases, strict=True):
            seen = {}  # the consumer's input and output in the original network
            h = net.get_submodule(r.consumer).register_forward_hook(
                lambda m, i, y, seen=seen: seen.update(x=i[0].detach(), y=y.detach())
            )
            net(x)
            h.remove()
            # the pruned consumer on the same input, less the unit's removed channels
            new = pruned.get_submodule(r.consumer)
            inp = seen["x"]
            if not isinstance(new, SampledConv2d):
                off = channel_offset(net, r)
                gone = torch.tensor([c for c in range(r.width) if c not in keep.tolist()]) + off
                mask = torch.ones(
                    inp.shape[1] // r.taps if r.consumer_kind == "linear" else inp.shape[1],
                    dtype=torch.bool,
                )
                mask[gone] = False
                if r.consumer_kind == "linear":  # channel-major features: taps per channel
                    mask = mask.repeat_interleave(r.taps)
                inp = inp[:, mask]
            with torch.no_grad():
                want = new(inp) - seen["y"]
            got, ref = _consumer_delta(net, r, keep, None, beta)(seen["x"], seen["y"])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=unit.name)
            if r.cat_lead is None:  # the reference: the consumer's output less its bias
                bias = net.get_submodule(r.consumer).bias
                own = seen["y"] - (0 if bias is None else bias.view(1, -1, *[1] * (ref.dim() - 2)))
                torch.testing.assert_close(ref, own, rtol=1e-4, atol=1e-5, msg=unit.name)
