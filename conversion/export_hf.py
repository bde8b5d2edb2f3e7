#!/usr/bin/env python
"""Convert a megatron checkpoint (any TP/PP) to a verified HF LlamaForCausalLM directory.

Same as `evolm export-hf key=value ...` (recipe: recipes/export_hf.yaml; see conversion/README.md):

    python conversion/export_hf.py src=... dst=...
"""

import sys

from evolm_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-hf", *sys.argv[1:]]))
