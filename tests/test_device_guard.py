"""The CPU stand-in for a GPU: a missing ``.to(DEVICE)`` fails here as it would on CUDA."""
import pytest
import torch

from dpo_tutorial.testing.device_guard import CrossDeviceError, DeviceGuard, GuardDevice, tag_of


@pytest.fixture
def device():
    with DeviceGuard():
        yield GuardDevice("cpu")


def test_a_model_on_device_refuses_a_host_batch(device):
    model = torch.nn.Conv2d(3, 4, 3).to(device)
    pixels = torch.randn(2, 3, 8, 8)  # built on the host, as a data pipeline does
    with pytest.raises(CrossDeviceError, match="conv2d: host and device"):
        model(pixels)
    assert model(pixels.to(device)).shape == (2, 4, 6, 6)


def test_moves_by_param_device_factories_and_cpu_are_tracked(device):
    model = torch.nn.Linear(3, 2).to(device)
    weight = next(model.parameters())
    assert tag_of(torch.ones(2, 3).to(weight.device)) == "device"  # .to(param.device)
    assert tag_of(torch.zeros(2, device=device)) == "device"
    assert tag_of(torch.zeros(2)) == "host"
    back = model(torch.ones(2, 3).to(device)).cpu()
    assert tag_of(back) == "host" and tag_of(back.to("cpu")) == "host"
    with pytest.raises(CrossDeviceError):
        model(back)


def test_scalars_indices_and_copies_may_cross_as_on_cuda(device):
    x = torch.arange(6.0).to(device)
    assert tag_of(x * torch.tensor(2.0)) == "device"  # a 0-dim host tensor
    assert x[torch.tensor([0, 2])].tolist() == [0.0, 2.0]  # host indices
    host = torch.zeros(6)
    host.copy_(x)
    assert host.tolist() == x.tolist()


def test_off_without_the_guard():
    model = torch.nn.Linear(3, 2).to(GuardDevice("cpu"))
    assert model(torch.ones(1, 3)).shape == (1, 2)
