"""`torchrun --nproc_per_node 2 -m evolm_nemo.train.entry key=value ...`: `evolm train` once per rank (the command
itself is ``evolm_nemo.stages.cli``)."""

from __future__ import annotations

import sys

from evolm_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
