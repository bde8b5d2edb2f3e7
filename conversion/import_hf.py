#!/usr/bin/env python
"""Convert an HF Llama-family directory to our megatron checkpoint.

Same as `evolm import-hf key=value ...` (recipe: recipes/import_hf.yaml; see conversion/README.md):

    python conversion/import_hf.py src=... dst=...
"""

import sys

from evolm_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main(["import-hf", *sys.argv[1:]]))
