#!/usr/bin/env python3
"""Model benchmark (prints one JSON object): batch-1 latency and batched throughput per backbone and dtype.

Examples:
    .venv/bin/python bench/bench_model.py                                    # CPU here: ViT-S and ViT-B, float32
    python bench/bench_model.py --device cuda --dtypes float32,float16,bfloat16 --batch-size 256   # a GPU
"""

import sys

from dinomix_ros.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
