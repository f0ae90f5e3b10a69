"""Where computation runs: peak FLOP/s by exact device model (MFU), the data-parallel defaults."""

import pytest
import torch

from shortcut.runtime import Dist, peak_flops, peak_from_table


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("Some Future GPU", None)])
def test_peak_by_exact_device_model(name, peak):
    assert peak_from_table(name) == peak


def test_no_peak_on_a_cpu():
    assert peak_flops(torch.device("cpu")) == (None, None)
    d = Dist()
    assert d.main and d.world == 1 and d.gather(3) == [3] and d.mean(torch.tensor(2.0)) == 2.0


@pytest.mark.slow
def test_gpu_check_plumbing_runs_on_a_cpu():
    """make gpu-check cannot run here; its --smoke mode drives the same code on tiny shapes."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "all checks passed" in r.stdout and "shortcut/baseline: step time" in r.stdout
    shortcut_ops = next(ln for ln in r.stdout.splitlines() if ln.startswith("shortcut attention ("))
    # inside the depth-and-context attention's own range, which names the implementation auto chose (chunked on a
    # CPU; the masked reference also runs the CPU flash kernel, so the kernel name alone would not tell)
    assert shortcut_ops.startswith("shortcut attention (depth_context_attention.chunked) ops:")
    assert "flash_attention" in shortcut_ops
