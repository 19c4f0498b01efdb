#!/usr/bin/env python3
"""Model benchmark (prints one JSON object): batch-1 latency and batched throughput per backbone and dtype.

Examples:
    .venv/bin/python bench/bench_model.py                                    # CPU here: ViT-S and ViT-B, fp32
    python bench/bench_model.py --device cuda --dtypes fp32,fp16,bf16 --batch 256   # a GPU
"""

import sys

from dinomix_ros.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
