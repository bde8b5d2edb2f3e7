"""config.errors.causes: the one walk of an exception chain (out_of_memory, refused_pickle, fileio.write_failure and
upstream's hub check are built on it)."""

import errno
import pickle

from evolm_nemo.config.errors import causes, out_of_memory, refused_pickle
from evolm_nemo.evaluation.upstream import _hub_unreachable
from evolm_nemo.fileio import write_failure


class CheckpointException(BaseException):  # torch.distributed.checkpoint's: per-rank failures in a dict
    def __init__(self, failures):
        super().__init__("failed")
        self.failures = failures


def test_each_exception_once_nearest_first():
    a, b, c, d = ValueError("a"), KeyError("b"), TypeError("c"), OSError("d")
    a.__cause__, a.__context__ = b, c
    b.__context__ = a  # a cycle
    c.__context__ = d
    assert list(causes(a)) == [a, b, c, d]
    assert list(causes(None)) == []
    rank = OSError(errno.ENOSPC, "No space left on device")
    wrapped = CheckpointException({0: rank, 1: "not an exception"})
    assert list(causes(wrapped)) == [wrapped, rank]


def test_every_check_follows_cause_context_and_failures():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert write_failure(CheckpointException({0: full})) == "No space left on device"
    outer = RuntimeError("load failed")
    outer.__cause__, outer.__context__ = ValueError("unrelated"), pickle.UnpicklingError("GLOBAL posix.system")
    assert refused_pickle(outer) == "it holds more than tensors: a reference to posix.system"
    outer.__context__ = MemoryError()
    assert out_of_memory(outer) == "out of memory"
    outer.__context__ = ConnectionError("no route to host")  # followed even though __cause__ is set
    assert _hub_unreachable(outer) == "ConnectionError: no route to host"
    assert _hub_unreachable(ValueError("x")) is None
