"""`dlmoe eval`: likelihood-based evaluation of a trained run.

    dlmoe eval --run RUN_DIR [--text FILE ...] [--mcq FILE.jsonl ...] [--validation]
               [--method elbo|letter|both] [--mc-num 16] [--limit N] [--seed 0] [--out results.json]
               [--device cpu|cuda|auto] [--dtype auto|bf16|fp32|keep]

Prints one JSON line per evaluation: the run's validation ELBO (`--validation`, the default when
no file is given), the ELBO bound and bits per byte of each `--text` file, the accuracy of each
`--mcq` file per method (with a Wilson 95% interval and the chance level), each with the weight
dtype it ran in and why (`--dtype auto`: bf16 only where the hardware runs it natively). Bad jsonl lines are
skipped and counted. Every input is checked before the model is loaded; `--out` refuses an
existing file unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dlmoe._checks import check_int
from dlmoe._fs import atomic_write_text
from dlmoe.eval.mcq_file import McqData, read_mcq_jsonl
from dlmoe.eval.multiple_choice import METHODS, letter_tokens, score_mcq
from dlmoe.eval.perplexity import read_text_file, text_elbo
from dlmoe.precision import PRECISIONS, Precision, resolve_precision
from dlmoe.runtime import resolve_device


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation ELBO, text perplexity bound / bits per byte, multiple-choice accuracy",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--text", action="extend", nargs="+", default=[], metavar="FILE", help="UTF-8 text files")
    p.add_argument(
        "--mcq", action="extend", nargs="+", default=[], metavar="FILE.jsonl",
        help='jsonl lines {"question", "choices", "answer": index or letter}',
    )  # fmt: skip
    p.add_argument("--validation", action="store_true", help="the run's validation ELBO (default without files)")
    p.add_argument("--method", default="elbo", choices=[*METHODS, "both"], help="multiple-choice scoring")
    p.add_argument("--mc-num", dest="mc_num", type=int, default=16, help="ELBO samples per answer / text chunk")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="rows per forward")
    p.add_argument("--limit", type=int, help="first N valid questions of each --mcq file")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="--text chunk length (default: the run's seq_len)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--dtype", default="auto", choices=[*PRECISIONS, "keep"],
        help="weight dtype: auto = bf16 where the device runs it natively, else fp32; keep = the checkpoint's own "
        "(default: auto; --validation runs on the CPU, so auto resolves there for it)",
    )  # fmt: skip
    p.add_argument("--out", help="also write all results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", dest="no_progress", action="store_true")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    """Check every input, load the run once, print (and collect) one JSON line per evaluation."""
    from dlmoe.inference import eval_ppl, load_run

    # 1. inputs, before anything slow
    check_int("--mc-num", args.mc_num, low=1)
    check_int("--batch-size", args.batch_size, low=1)
    check_int("--seed", args.seed)
    if args.limit is not None:
        check_int("--limit", args.limit, low=1)
    if args.seq_len is not None:
        check_int("--seq-len", args.seq_len, low=1)
    out = _check_out(args.out, args.overwrite)
    texts = {path: read_text_file(path, "--text") for path in args.text}
    mcqs = [read_mcq_jsonl(path, limit=args.limit) for path in args.mcq]
    methods = list(METHODS) if args.method == "both" else [args.method]
    device = resolve_device(args.device, "--device")
    precision = _precision(args.dtype, device)
    config, model, tokenizer = load_run(args.run)
    model.to(device=device, dtype=None if precision is None else precision.dtype)
    letter_form = None
    if "letter" in methods and any(data.items for data in mcqs):  # fail now, not after the ELBO pass
        letter_form = letter_tokens(tokenizer, max(len(item.choices) for data in mcqs for item in data.items)).form
    progress = not args.no_progress
    meta = {"run": str(args.run), "seed": args.seed}
    results = []

    def emit(record: dict, started: float) -> None:
        record = meta | record | {"seconds": round(time.perf_counter() - started, 3)}
        results.append(record)
        print(json.dumps(_rounded(record)), flush=True)

    # 2. evaluations
    if args.validation or not (texts or mcqs):
        started = time.perf_counter()
        on_cpu = _precision(args.dtype, "cpu")  # eval_ppl runs on the CPU
        validation = eval_ppl(args.run, seed=args.seed, dtype=None if on_cpu is None else on_cpu.dtype)
        emit({"eval": "validation"} | validation | _dtype_fields(on_cpu), started)
    seq_len = args.seq_len if args.seq_len is not None else min(config.data.seq_len, config.model.max_seq_len)
    for path, text in texts.items():
        started = time.perf_counter()
        bound = text_elbo(
            model, tokenizer, text, seq_len=seq_len, mc_num=args.mc_num, batch_size=args.batch_size,
            seed=args.seed, progress=progress,
        )  # fmt: skip
        emit({"eval": "text", "file": path} | bound.as_dict() | _dtype_fields(precision), started)
    for data in mcqs:
        for method in methods:
            started = time.perf_counter()
            result = score_mcq(
                model, tokenizer, data.items, method, mc_num=args.mc_num, batch_size=args.batch_size,
                seed=args.seed, progress=progress,
            )  # fmt: skip
            extra = {"letter_token": letter_form} if method == "letter" else {"mc_num": args.mc_num}
            record = _mcq_record(data, result.as_dict()) | extra | _dtype_fields(precision)
            emit({"eval": "mcq", "file": data.path} | record, started)
    # 3. the results file, written whole or not at all
    if out is not None:
        _write_json(out, {"results": [_rounded(r) for r in results]})


def _mcq_record(data: McqData, result: dict) -> dict:
    too_long = result.pop("skipped")
    return result | {
        "skipped": data.skipped + too_long,
        "skipped_lines": data.skipped,
        "skipped_too_long": too_long,
        "problems": data.problems,
    }


def _check_out(path: str | None, overwrite: bool) -> Path | None:
    if path is None:
        return None
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {str(out)!r} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    return out


def _write_json(path: Path, payload: dict) -> None:
    """Atomic (temporary file in the same folder, then rename): no half-written results."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _precision(requested: str, device: torch.device | str) -> Precision | None:
    """The run-time weight precision on `device`; None for `keep` (the checkpoint's own dtype)."""
    return None if requested == "keep" else resolve_precision(requested, device)


def _dtype_fields(precision: Precision | None) -> dict:
    """What a result line says about its dtype: {"dtype", "dtype_reason"}."""
    if precision is None:
        return {"dtype": "keep", "dtype_reason": "keep: the checkpoint's own weights dtype"}
    return {"dtype": precision.name, "dtype_reason": precision.reason}


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value
