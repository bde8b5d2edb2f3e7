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


def test_optimizers_run_without_loading_dynamo_and_step_the_same():
    """Redirection 9: with the layer active, AdamW (and Adam, SGD) construct, step, zero their grads and round-trip
    their state without importing torch._dynamo, and the parameters they produce equal torch's own step bitwise
    (the reference runs in a process without the layer); grad mode is the caller's after a step."""
    code = r"""
import sys, torch
if sys.argv[1] == "layer":
    from evolm_nemo.runtime import cpu_compat
    assert cpu_compat.activate()
torch.manual_seed(0)
out = []
for make in (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=1e-2),
             lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)):
    m = torch.nn.Linear(8, 4)
    opt = make(m.parameters())
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
    opt.load_state_dict(opt.state_dict())
    assert torch.is_grad_enabled()
    out += [p.detach().clone() for p in m.parameters()]
if sys.argv[1] == "layer":
    assert "torch._dynamo" not in sys.modules, "dynamo was imported"
torch.save(out, sys.argv[2])
"""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as d:
        got = {}
        for mode in ("layer", "plain"):
            proc = subprocess.run([sys.executable, "-c", code, mode, f"{d}/{mode}.pt"], cwd=REPO,
                                  env=subprocess_env(), capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            got[mode] = torch.load(f"{d}/{mode}.pt", weights_only=True)
    assert len(got["layer"]) == len(got["plain"]) == 6
    for a, b in zip(got["layer"], got["plain"]):
        assert torch.equal(a, b)
