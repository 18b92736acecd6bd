"""Benchmark `dlmoe serve`'s request batching: throughput, latency and exactness under concurrent clients.

The model (configs/demo.yaml, the README's demo: expert choice, 16 experts, d_model 256, 4 layers,
vocab 4096, trained here for `--train-steps` (150) steps into runs/bench-serve unless it holds a
model) is served in-process on 127.0.0.1 (`dlmoe.serve.background.ServerThread`, an ephemeral
port, a fresh server per case, one engine). N distinct prompts (held-out snippets of the run's
validation text, 8 to 40 tokens) are sent round-robin by `clients` concurrent closed-loop clients
(asyncio + httpx: each sends its next request when the previous one answered), `--requests` (200)
requests in each case, the same prompts and greedy settings (temperature 0, gen_length 32,
block_length 16, steps 32, no cache) everywhere. Cases: clients 1, 4, 16 × batching off
(max_batch_rows 1) / on (max_batch_rows 16, max_wait_ms `--max-wait-ms`); over `--rounds` rounds the
off/on order alternates, so machine noise hits both alike; one untimed warm-up runs first.

Prints a meta line (machine, threads, torch, model, dtype and why, settings, prompts), then one JSON
object per case:
    case, clients, batching, max_batch_rows, requests, failed, tokens, wall_s, tokens_per_s
    (completion tokens of the answered requests / the case's wall time), p50_ms, p99_ms (client-side
    request latency), mean_batch_rows (rows per generate call: /metrics' dlmoe_batch_rows
    histogram, sum / count), mean_batch_rows_per_request (the responses' dlmoe.stats.batch_rows,
    averaged over requests), identical (every answer equals a direct `dlmoe.generate` of its prompt
    alone, decoded as the server decodes), mismatches, cut_short (the deadline stopped it early),
    batching_off_tokens_per_s, batching_off_p50_ms, batching_off_p99_ms, speedup (tokens_per_s over
    batching off's, same clients)
and a summary row: speedup_16_clients, targets (≥ 2.5× at 16 clients, 0 failed, identical
everywhere) and targets_met.

    python bench/serve.py                        # trains runs/bench-serve on first use (a few minutes)
    python bench/serve.py --threads 1 --requests 40
    python bench/serve.py --quick                # tiny model trained in a temp dir, few requests (the test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx

from dlmoe.model.flops import model_size
from dlmoe.precision import PRECISIONS, hardware_info, resolve_precision
from dlmoe.runtime import prepare_benchmark
from dlmoe.sampling import SamplerConfig, generate
from dlmoe.serve import BatchSettings, Engine, create_app
from dlmoe.serve.background import ServerThread
from dlmoe.serve.protocol import CompletionRequest, sampler_for
from inference_setup import last_val_loss, pick_prompts

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 4, 16)
BATCH_ROWS = 16
TARGETS = {"speedup_16_clients": 2.5, "failed": 0, "identical": True}
QUICK_MODEL = {
    "data.vocab_size": 300, "data.seq_len": 64, "data.validation_fraction": 0.25, "model.dim": 32,
    "model.num_layers": 2, "model.num_heads": 2, "model.max_seq_len": 64, "model.dense_hidden": 64,
    "model.moe.expert_hidden": 32, "model.moe.router.num_experts": 4, "model.moe.router.num_experts_per_tok": 2,
    "train.steps": 12, "train.batch_size": 4, "train.eval_every": 6, "train.eval_batches": 2,
    "train.checkpoint_every": 6, "train.warmup_steps": 1, "train.lr": 1e-2, "train.log_every": 1,
}  # fmt: skip


@dataclass
class Answer:
    """One request as its client saw it."""

    prompt: int
    seconds: float
    status: int  # 0: transport error or timeout
    text: str | None = None
    tokens: int = 0
    batch_rows: int | None = None


@dataclass
class CaseRun:
    """A case's requests over its rounds."""

    answers: list[Answer] = field(default_factory=list)
    wall_s: float = 0.0
    calls: float = 0.0  # generate calls (dlmoe_batch_rows count)
    rows: float = 0.0  # rows over those calls (dlmoe_batch_rows sum)
    cut_short: bool = False


# ----------------------------------------------------------------------------- model and prompts


def train_run(args: argparse.Namespace) -> tuple[Path, dict]:
    """The run folder, trained first unless it holds a model (--quick: a tiny one in a temp dir)."""
    from dlmoe.config_io import load_run_config
    from dlmoe.train import Trainer

    overrides = [f"run_dir={args.run}", f"train.steps={args.train_steps}"]
    if args.quick:
        corpus = quick_corpus(Path(args.run).parent / "corpus")
        overrides += [f"data.corpus={corpus}", f"data.cache_dir={Path(args.run).parent / 'cache'}"]
        overrides += [f"{k}={v}" for k, v in QUICK_MODEL.items()]
    run, facts = Path(args.run), {"run": str(args.run), "trained_now": False}
    if args.retrain or not (run / "model" / "config.json").is_file():
        print(f"training {run} from {args.config} ...", file=sys.stderr, flush=True)
        config = load_run_config(args.config, overrides)
        summary = Trainer(config, overwrite=args.retrain, progress=False).fit()
        facts |= {"trained_now": True, "train_s": round(summary.wall_s, 1)}
    from dlmoe.inference import read_run_config

    steps = read_run_config(run).train.steps
    return run, facts | {"train_steps": steps, "val_elbo": last_val_loss(run / "metrics.csv")}


def quick_corpus(folder: Path) -> Path:
    """--quick: the first 6000 characters of the first 8 bundled Shakespeare plays (a real, small text)."""
    from dlmoe.data.corpus import resolve_corpus

    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in zip(range(8), resolve_corpus("shakespeare"), strict=False):
        (folder / f"play{i}.txt").write_text(doc[:6000], encoding="utf-8")
    return folder


def prompt_texts(engine: Engine, run: Path, lengths: list[int]) -> list[str]:
    """One held-out validation snippet per length (token ids free of specials), as text."""
    from dlmoe.inference import read_run_config
    from dlmoe.train.data_setup import prepare_data

    rows = [row for batch in prepare_data(read_run_config(run), run).validation_batches for row in batch]
    specials = {engine.config.mask_id, engine.config.eos_id, engine.config.pad_id}
    return [engine.tokenizer.decode(p.tolist()) for p in pick_prompts(rows, lengths, max(specials) + 1)]


def request_body(args: argparse.Namespace, text: str) -> dict:
    return {"prompt": text, "max_tokens": args.gen_length, "temperature": 0.0, "block_length": args.block_length,
            "steps": args.steps}  # fmt: skip


def references(engine: Engine, texts: list[str], args: argparse.Namespace) -> list[str]:
    """Each prompt alone through a direct `dlmoe.generate`, with the sampler the server builds from the
    same request body, decoded as the server decodes (text up to EOS when stop_at_eos)."""
    out = []
    for text in texts:
        sampler = sampler_for(CompletionRequest(**request_body(args, text)), engine.defaults)
        ids = engine.encode([text], sampler)[0]
        generated = generate(engine.model, [ids], sampler).generated[0].tolist()
        eos = engine.config.eos_id if sampler.eos_id is None else sampler.eos_id
        if sampler.stop_at_eos and eos in generated:
            generated = generated[: generated.index(eos)]
        out.append(engine.tokenizer.decode(generated))
    return out


# ----------------------------------------------------------------------------- clients and cases


async def client_loop(http: httpx.AsyncClient, url: str, bodies: list[dict], todo: list, deadline: float) -> list:
    """One closed-loop client: take the next request number, send it, wait for the answer, repeat."""
    answers = []
    while todo and time.monotonic() < deadline:
        k = todo.pop()
        prompt = k % len(bodies)
        started = time.perf_counter()
        try:
            response = await http.post(f"{url}/v1/completions", json=bodies[prompt])
            seconds = time.perf_counter() - started
            if response.status_code != 200:
                answers.append(Answer(prompt, seconds, response.status_code))
                continue
            body = response.json()
            stats = (body.get("dlmoe") or {}).get("stats") or {}
            answers.append(Answer(prompt, seconds, 200, body["choices"][0]["text"],
                                  body["usage"]["completion_tokens"], stats.get("batch_rows")))  # fmt: skip
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            answers.append(Answer(prompt, time.perf_counter() - started, 0))
    return answers


async def drive(url: str, bodies: list[dict], clients: int, requests: int, args: argparse.Namespace) -> tuple:
    """(answers, wall seconds, cut short) of `requests` requests from `clients` concurrent clients."""
    todo = list(range(requests))[::-1]  # popped from the end: request k asks for prompt k mod N
    timeout = httpx.Timeout(args.request_timeout)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        started = time.perf_counter()
        parts = await asyncio.gather(*(client_loop(http, url, bodies, todo, args.deadline) for _ in range(clients)))
        wall = time.perf_counter() - started
    return [a for part in parts for a in part], wall, bool(todo)


def batch_rows_metric(url: str) -> tuple[float, float]:
    """(sum, count) of the server's dlmoe_batch_rows histogram (rows per generate call)."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("dlmoe_batch_rows_sum", "dlmoe_batch_rows_count"):
            values[name] = float(value)
    return values.get("dlmoe_batch_rows_sum", 0.0), values.get("dlmoe_batch_rows_count", 0.0)


def run_case(engine: Engine, bodies: list[dict], clients: int, batching: bool, requests: int,
             args: argparse.Namespace) -> tuple:  # fmt: skip
    """One fresh loopback server (batching on or off) driven by the clients: (answers, wall, sum, count, cut)."""
    settings = BatchSettings(max_batch_rows=BATCH_ROWS if batching else 1, max_wait_ms=args.max_wait_ms,
                             max_queue=max(256, 2 * clients))  # fmt: skip
    server = ServerThread(create_app(engine, settings, shutdown_grace_s=5), grace_s=5).start()
    try:
        answers, wall, cut = asyncio.run(drive(server.url, bodies, clients, requests, args))
        rows, calls = batch_rows_metric(server.url)
    finally:
        server.stop()
    return answers, wall, rows, calls, cut


def collect(engine: Engine, bodies: list[dict], args: argparse.Namespace) -> dict[tuple[int, bool], CaseRun]:
    """Every case over the rounds: per client count, off then on in one round and on then off in the next."""
    runs = {(c, b): CaseRun() for c in CLIENTS for b in (False, True)}
    shares = [args.requests // args.rounds + (r < args.requests % args.rounds) for r in range(args.rounds)]
    started = time.perf_counter()
    for r, share in enumerate(shares):
        for i, clients in enumerate(CLIENTS):
            for batching in (False, True) if (r + i) % 2 == 0 else (True, False):
                if time.monotonic() >= args.deadline:
                    runs[clients, batching].cut_short = True
                    continue
                answers, wall, rows, calls, cut = run_case(engine, bodies, clients, batching, share, args)
                run = runs[clients, batching]
                run.answers += answers
                run.wall_s, run.rows, run.calls = run.wall_s + wall, run.rows + rows, run.calls + calls
                run.cut_short |= cut
                done = f"round {r + 1}/{args.rounds}: {clients} clients, batching {'on' if batching else 'off'}"
                print(f"{done} in {wall:.1f} s ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return runs


# ----------------------------------------------------------------------------- rows


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (q in [0, 100]); None when empty."""
    if not values:
        return None
    ordered, position = sorted(values), (len(values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def case_row(clients: int, batching: bool, run: CaseRun, refs: list[str]) -> dict:
    ok = [a for a in run.answers if a.status == 200]
    latencies = [a.seconds * 1e3 for a in ok]
    tokens = sum(a.tokens for a in ok)
    mismatches = sum(a.text != refs[a.prompt] for a in ok)
    per_request = [a.batch_rows for a in ok if a.batch_rows is not None]
    return {
        "case": f"clients{clients}/batching_{'on' if batching else 'off'}",
        "clients": clients,
        "batching": batching,
        "max_batch_rows": BATCH_ROWS if batching else 1,
        "requests": len(run.answers),
        "failed": len(run.answers) - len(ok),
        "tokens": tokens,
        "wall_s": round(run.wall_s, 3),
        "tokens_per_s": _round(tokens / run.wall_s if run.wall_s > 0 else None),
        "p50_ms": _round(percentile(latencies, 50), 1),
        "p99_ms": _round(percentile(latencies, 99), 1),
        "mean_batch_rows": _round(run.rows / run.calls if run.calls else None, 3),
        "mean_batch_rows_per_request": _round(statistics.fmean(per_request) if per_request else None, 3),
        "identical": bool(ok) and mismatches == 0,
        "mismatches": mismatches,
        "cut_short": run.cut_short,
    }


def with_baselines(rows: dict[tuple[int, bool], dict]) -> list[dict]:
    """Each row next to batching off's figures for the same client count, and its speedup over them."""
    out = []
    for (clients, _), row in rows.items():
        off = rows[clients, False]
        speedup = row["tokens_per_s"] / off["tokens_per_s"] if row["tokens_per_s"] and off["tokens_per_s"] else None
        out.append(row | {"batching_off_tokens_per_s": off["tokens_per_s"], "batching_off_p50_ms": off["p50_ms"],
                          "batching_off_p99_ms": off["p99_ms"], "speedup": _round(speedup, 3)})  # fmt: skip
    return out


def summary(rows: list[dict], wall_s: float) -> dict:
    speedup = next(r["speedup"] for r in rows if r["clients"] == CLIENTS[-1] and r["batching"])
    failed, identical = sum(r["failed"] for r in rows), all(r["identical"] for r in rows)
    met = {"speedup_16_clients": speedup is not None and speedup >= TARGETS["speedup_16_clients"],
           "failed": failed == TARGETS["failed"], "identical": identical}  # fmt: skip
    return {"case": "summary", "speedup_16_clients": speedup, "failed": failed, "identical": identical,
            "cut_short": any(r["cut_short"] for r in rows), "targets": TARGETS, "targets_met": met,
            "all_targets_met": all(met.values()), "wall_s": round(wall_s, 1)}  # fmt: skip


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="run folder, trained if it holds no model (default runs/bench-serve)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="config to train with")
    p.add_argument("--train-steps", type=int, default=150, help="training steps when the run is trained here")
    p.add_argument("--retrain", action="store_true", help="train again even if the run holds a model")
    p.add_argument("--requests", type=int, default=200, help="requests in each case (split over the rounds)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the off/on order alternates between them")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[8, 12, 16, 20, 24, 28, 34, 40])
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="batching on: how long a request waits for mates")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request before it counts failed")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=3600.0,
        help="whole bench, training included: no request starts after this many seconds (rows: cut_short)",
    )
    p.add_argument("--dtype", default="auto", choices=PRECISIONS, help="weight dtype (auto: bf16 only if native)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny model trained in a temp dir, 32 requests per case")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.train_steps = min(args.requests, 32), 1, 12
        args.prompt_lengths, args.gen_length, args.block_length, args.steps = [4, 6, 8, 10, 12, 14], 16, 8, 16
    if args.requests < 1 or args.rounds < 1 or args.requests < args.rounds:
        p.error("--requests and --rounds must be >= 1, and --requests >= --rounds")
    args.precision = resolve_precision(args.dtype, "cpu")
    return args


def model_facts(engine: Engine, args: argparse.Namespace) -> dict:
    c, router = engine.config, engine.config.moe.router
    size = model_size(c, max(args.prompt_lengths) + args.gen_length)
    return {"dim": c.dim, "layers": c.num_layers, "heads": c.num_heads, "vocab": c.vocab_size,
            "experts": router.num_experts, "k": router.num_experts_per_tok, "router": router.kind,
            "capacity_schedule": getattr(router, "capacity_schedule", None), "total_params": size.total_params,
            "active_params": round(size.active_params), "batching_rows_interact": engine.rows_interact}  # fmt: skip


def describe(engine: Engine, texts: list[str], body: dict, args: argparse.Namespace) -> dict:
    """The meta line's model, precision, machine, sampler settings (as the server resolves them) and load."""
    sampler, precision = sampler_for(CompletionRequest(**body), engine.defaults), args.precision
    return {
        "model": model_facts(engine, args), "dtype": precision.name, "dtype_reason": precision.reason,
        "hardware": hardware_info().as_dict(), "prompt_tokens": [len(engine.tokenizer.encode(t)) for t in texts],
        "settings": {"gen_length": sampler.gen_length, "block_length": sampler.block_length, "steps": sampler.steps,
                     "temperature": sampler.temperature, "cache": sampler.cache, "remasking": sampler.remasking,
                     "stop_at_eos": sampler.stop_at_eos},
        "clients": list(CLIENTS), "requests_per_case": args.requests, "rounds": args.rounds,
        "batching_on": {"max_batch_rows": BATCH_ROWS, "max_wait_ms": args.max_wait_ms},
        "batching_off": {"max_batch_rows": 1},
        "request_timeout_s": args.request_timeout, "deadline_s": args.deadline_s, "host": "127.0.0.1",
    }  # fmt: skip


def bench(args: argparse.Namespace, meta: dict) -> None:
    run, facts = train_run(args)
    defaults = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    engine = Engine.from_run(run, defaults, dtype=args.precision.dtype)
    texts = prompt_texts(engine, run, args.prompt_lengths)
    bodies = [request_body(args, text) for text in texts]
    print(json.dumps(meta | facts | describe(engine, texts, bodies[0], args)), flush=True)
    started = time.perf_counter()
    refs = references(engine, texts, args)  # also warms the model up, batch 1
    run_case(engine, bodies, CLIENTS[-1], True, 2 * CLIENTS[-1], args)  # warm-up: batched shapes, HTTP stack
    print(f"references and warm-up: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    runs = collect(engine, bodies, args)
    rows = with_baselines({key: case_row(*key, run, refs) for key, run in runs.items()})
    for row in rows:
        print(json.dumps(row), flush=True)
    print(json.dumps(summary(rows, time.perf_counter() - started)), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.deadline = time.monotonic() + args.deadline_s
    meta = prepare_benchmark(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.run is None:
            args.run = str(Path(tmp) / "run") if args.quick else str(ROOT / "runs" / "bench-serve")
        bench(args, meta)


if __name__ == "__main__":
    sys.exit(main())
