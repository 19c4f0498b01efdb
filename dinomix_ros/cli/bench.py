"""``dinomix bench``: batch-1 latency and batched throughput of the model per backbone, dtype and backend, as
JSON."""

from __future__ import annotations

import argparse
import json

from dinomix_ros.cli.common import add_command
from dinomix_ros.settings import add_flags, from_flags, spec_of

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``dinomix`` commands."""
    add_command(sub, "bench", _add_arguments, run=run,
                summary="model latency/throughput benchmark, printed as JSON")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from dinomix_ros.model.encoder import EncoderConfig

    p.add_argument("--variants", default="vits14,vitb14", help="comma-separated backbones")
    p.add_argument("--dtypes", default="float32",
                   help=f"comma-separated inference precisions ({','.join(spec_of(EncoderConfig, 'dtype').choices)})")
    p.add_argument("--backends", default="torch",
                   help=f"comma-separated runtimes ({','.join(spec_of(EncoderConfig, 'backend').choices)})")
    add_flags(p, EncoderConfig, fields=("device", "batch_size", "cuda_graphs"))
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")


def run(args: argparse.Namespace) -> int:
    """``dinomix bench``: every backbone in every precision, on one device."""
    from dinomix_ros.model.benchmark import bench_model
    from dinomix_ros.model.encoder import EncoderConfig

    config = from_flags(EncoderConfig, args)
    dtypes = args.dtypes.split(",")
    backends = args.backends.split(",")
    for flag, values, field in (("--dtypes", dtypes, "dtype"), ("--backends", backends, "backend")):
        allowed = spec_of(EncoderConfig, field).choices
        unknown = [d for d in values if d not in allowed]
        if unknown:
            raise ValueError(f"{flag} holds {', '.join(unknown)}; expected a comma-separated list of "
                             f"{', '.join(allowed)}")
    result = bench_model(variants=args.variants.split(","), dtypes=dtypes, device=config.device,
                         batch=config.batch_size, iters=args.iters, warmup=args.warmup,
                         cuda_graphs=config.cuda_graphs, backends=backends)
    print(json.dumps(result, indent=2))
    return 0
