"""Where computation runs: peak FLOP/s by exact device model (MFU), the data-parallel defaults."""

import pytest
import torch

from shortcut.runtime import Dist, peak_flops, peak_from_table


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("Some Future GPU", None)])
def test_peak_by_exact_device_model(name, peak):
    assert peak_from_table(name) == peak


def test_no_peak_on_a_cpu():
    assert peak_flops(torch.device("cpu")) == (None, None)
    d = Dist()
    assert d.main and d.world == 1 and d.gather(3) == [3] and d.mean(torch.tensor(2.0)) == 2.0
