"""Process groups, megatron parallel state, device choice and seeding: the runtime every stage starts from.

Works under `torchrun` (any world size) and as a plain single process (it then creates a one-rank group itself).
NCCL on GPU, gloo on CPU (with the CPU compatibility layer applied).
"""

from __future__ import annotations

import os
import random
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from evolm_nemo.runtime import cpu_compat


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    tp: int
    pp: int
    dp: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def resolve_precision(precision):
    """``train.precision`` as this machine runs it: ``auto`` is ``bf16`` on GPU and ``fp32`` on CPU; any other
    value as it is."""
    return ("bf16" if resolve_dtype(precision) == torch.bfloat16 else "fp32") if precision == "auto" else precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(tp: int, pp: int, seed: int, precision: str = "auto") -> Runtime:
    """Initialise torch.distributed and megatron's parallel state (idempotent per process)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.activate()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `evolm train`: a group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Runtime(rank=dist.get_rank(), world_size=world, device=device, dtype=resolve_dtype(precision), tp=tp,
                   pp=pp, dp=world // (tp * pp))


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def owned_group():
    """For one-process commands called as a library (import-hf, export-hf): whatever group such a command creates is
    torn down when it ends, so the calling process is left as it was; a group the caller already had is kept."""
    owned = not dist.is_initialized()
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    before = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            teardown()
        if owned:  # the rendezvous variables `setup` set for its group of one (a later child must not inherit them)
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
