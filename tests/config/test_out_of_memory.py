"""config.errors.out_of_memory: what a failed allocation asked for, from the errors torch and Python really raise
(the one-line errors of train.loop.fit and the CLI are built on it; tests/train/test_resume.py runs one)."""

import pytest
import torch

from evolm_nemo.config.errors import out_of_memory


def _cpu_failure() -> RuntimeError:
    try:
        torch.empty(1 << 42, dtype=torch.uint8)  # 4 TiB: more than any test machine can give
    except RuntimeError as exc:
        return exc
    pytest.skip("this machine allocated 4 TiB")


def test_cpu_allocator_failure_says_how_much():
    assert out_of_memory(_cpu_failure()) == "tried to allocate 4096.00 GiB"


def test_a_failure_raised_from_it_is_one_too():
    try:
        try:
            raise _cpu_failure()
        except RuntimeError as inner:
            raise ValueError("while building the model") from inner
    except ValueError as outer:
        assert out_of_memory(outer) == "tried to allocate 4096.00 GiB"


def test_cuda_and_python_failures():
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
                                  "79.10 GiB of which 3.06 MiB is free.")
    assert out_of_memory(cuda) == "tried to allocate 20.00 MiB"
    assert out_of_memory(MemoryError()) == "out of memory"


def test_other_errors_are_not():
    assert out_of_memory(RuntimeError("shape mismatch")) is None
    assert out_of_memory(ValueError("can't allocate memory")) is None  # not an allocator's error
