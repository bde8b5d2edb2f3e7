#!/usr/bin/env python
"""Convert an HF directory to a TensorRT-LLM engine (GPU, NVIDIA's TensorRT-LLM container).

Same as `evolm export-trtllm key=value ...` (recipe: recipes/export_trtllm.yaml; see conversion/README.md):

    python conversion/export_trtllm.py src=... dst=...
"""

import sys

from evolm_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-trtllm", *sys.argv[1:]]))
