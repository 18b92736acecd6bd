"""`dlmoe serve`: serve a trained run (or a converted checkpoint's run folder) over HTTP.

The sampler flags of `dlmoe sample` become the server's defaults (requests override them); the
batching flags bound the queue and the batches. `dlmoe.serve` (FastAPI, uvicorn) is imported only
when the command runs, so the rest of the CLI needs none of the `serve` extra.
"""

from __future__ import annotations

import argparse

from dlmoe._checks import check_float, check_int
from dlmoe.cli_sample import add_device_flags, add_sampler_flags, sampler_from_args

EXTRA_HINT = (
    "dlmoe serve needs the serve extra: pip install 'dlmoe[serve]' (FastAPI, uvicorn, sse-starlette, prometheus-client)"
)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with request batching, streaming and a page")
    p.add_argument("--run", required=True, help="a trained run folder (holds model/)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    add_sampler_flags(p)
    add_device_flags(p)
    p.add_argument("--max-batch-size", dest="max_batch_rows", type=int, default=16,
                   help="rows (prompts × n) per generate call; 1 turns batching off (default: 16)")  # fmt: skip
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, default=10.0,
                   help="how long a request waits for batch-mates (default: 10)")  # fmt: skip
    p.add_argument("--max-queue", dest="max_queue", type=int, default=256,
                   help="waiting requests before new ones get 503 (default: 256)")  # fmt: skip
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown before they are cancelled")  # fmt: skip
    p.set_defaults(func=serve, prompt=None, num_samples=None)


def serve(args: argparse.Namespace) -> None:
    """Check every flag, load the model, then serve until interrupted (SIGINT / SIGTERM: graceful)."""
    from dlmoe.inference import read_run_config
    from dlmoe.offload.load import parse_size
    from dlmoe.precision import resolve_precision
    from dlmoe.runtime import resolve_device

    check_int("--port", args.port, low=0, high=65535)
    check_float("--shutdown-timeout", args.shutdown_timeout, low=0.0)
    if args.threshold is not None:
        check_float("--threshold", args.threshold, low=0.0, high=1.0, low_open=True)
    try:
        import uvicorn

        from dlmoe.serve import BatchSettings, Engine, create_app
    except ImportError as error:
        raise ValueError(f"{EXTRA_HINT}; missing: {error.name}") from None
    settings = BatchSettings(max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    device = resolve_device(args.device, "--device")
    precision = None if args.dtype == "keep" else resolve_precision(args.dtype, device)
    run_config = read_run_config(args.run)
    defaults = sampler_from_args(args, run_config.sample, run_config.model.eos_id, batch=False)
    engine = Engine.from_run(
        args.run, defaults, device=device, dtype=None if precision is None else precision.dtype,
        expert_memory=None if args.expert_memory is None else parse_size(args.expert_memory),
    )  # fmt: skip
    app = create_app(engine, settings, shutdown_grace_s=args.shutdown_timeout)
    dtype = "keep" if precision is None else f"{precision.name} ({precision.reason})"
    print(f"dlmoe serve: {engine.model_id} on {device}, {dtype}; page and API at http://{args.host}:{args.port}/")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=max(1, round(args.shutdown_timeout)))  # fmt: skip
    uvicorn.Server(config).run()
