"""The CUDA->CPU layer: applied only without CUDA, and what it redirects really works."""

import subprocess
import sys

from evolm_nemo.runtime import cpu_compat
from tests.conftest import REPO, subprocess_env


def test_activation_condition():
    assert cpu_compat.should_activate(cuda_available=False) is True
    assert cpu_compat.should_activate(cuda_available=True) is False


def test_inactive_when_cuda_present():
    # simulate a GPU machine: with is_available() -> True, activate() must not touch torch
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "orig = (torch.cuda.current_device, torch.cuda.manual_seed, torch.Tensor.cuda)\n"
        "from evolm_nemo.runtime import cpu_compat\n"
        "assert cpu_compat.activate() is False and not cpu_compat.is_active()\n"
        "assert (torch.cuda.current_device, torch.cuda.manual_seed, torch.Tensor.cuda) == orig\n"
        "from torch.overrides import _get_current_function_mode_stack as s; assert not s()\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_redirections_on_cpu():
    code = (
        "import torch\n"
        "from evolm_nemo.runtime import cpu_compat\n"
        "assert cpu_compat.activate() is True\n"
        "x = torch.zeros(3, device='cuda'); assert x.device.type == 'cpu'\n"
        "y = torch.ones(2).to('cuda:0'); assert y.device.type == 'cpu'\n"
        "z = torch.empty(2, device=torch.cuda.current_device()); assert z.device.type == 'cpu'\n"
        "assert torch.ones(1).type() == 'torch.cuda.FloatTensor'\n"
        "assert torch.ones(1).cuda().device.type == 'cpu'\n"
        "torch.cuda.manual_seed(7); a = torch.rand(3); torch.manual_seed(7); b = torch.rand(3)\n"
        "assert torch.equal(a, b)\n"
        "s = torch.cuda.get_rng_state(); c = torch.rand(2); torch.cuda.set_rng_state(s); assert torch.equal(c, torch.rand(2))\n"
        "e1, e2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)\n"
        "e1.record(); e2.record(); assert e1.elapsed_time(e2) >= 0\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
