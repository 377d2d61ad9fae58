"""oneDNN Linear layers: same function and gradients as float64, same parameters as nn.Linear."""

import copy

import pytest
import torch
from torch import nn

from bench.models.onednn import OneDnnLinear, onednn_available, with_onednn_linears

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _stack(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(inplace=True), nn.Linear(32, 8),
                         nn.ReLU(inplace=True), nn.Linear(8, 1))


def test_swap_keeps_the_parameter_objects_and_state_dict():
    module = _stack()
    parameters = list(module.parameters())
    keys = list(module.state_dict())
    with_onednn_linears(module)
    assert all(type(module[index]) is OneDnnLinear for index in (0, 2, 4))
    assert all(a is b for a, b in zip(module.parameters(), parameters))
    assert list(module.state_dict()) == keys
    assert isinstance(module[0], nn.Linear)  # readers of nn.Linear weights still find them


def test_forward_and_gradients_match_float64():
    module = with_onednn_linears(_stack())
    reference = copy.deepcopy(module).double()
    inputs = torch.randn(64, 13, generator=torch.Generator().manual_seed(1))
    inputs64 = inputs.double().requires_grad_()
    inputs.requires_grad_()
    output = module(inputs)
    # The float64 twin runs nn.Linear's own math (OneDnnLinear refuses float64 by design).
    expected = inputs64
    for layer in reference:
        expected = (nn.functional.linear(expected, layer.weight, layer.bias)
                    if isinstance(layer, nn.Linear) else torch.relu(expected))
    assert torch.allclose(output.double(), expected, rtol=1e-5, atol=1e-6)
    output.square().sum().backward()
    expected.square().sum().backward()
    assert torch.allclose(inputs.grad.double(), inputs64.grad, rtol=1e-4, atol=1e-6)
    for ours, theirs in zip(module.parameters(), reference.parameters()):
        assert torch.allclose(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)


def test_inference_mode_runs_without_a_graph():
    module = with_onednn_linears(_stack())
    inputs = torch.randn(4, 13)
    with torch.inference_mode():
        output = module(inputs)
    assert output.shape == (4, 1) and torch.isfinite(output).all()


@pytest.mark.parametrize("inputs", [torch.randn(2, 3, 13), torch.randn(4, 13).double()])
def test_refuses_inputs_it_does_not_compute(inputs):
    with pytest.raises(TypeError, match="2-D float32 CPU"):
        with_onednn_linears(_stack())(inputs)
