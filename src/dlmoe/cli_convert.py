"""`dlmoe convert`: a LLaDA-MoE / LLaDA2 checkpoint folder → a dlmoe run folder, or a run → that layout."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from dlmoe.precision import PRECISIONS, resolve_precision
from dlmoe.runtime import resolve_device

# a storage dtype: keep (the checkpoint's) is the default; auto = what this machine computes in fast
STORAGE_DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPES = ("keep", *PRECISIONS)


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="import a LLaDA-MoE / LLaDA2 checkpoint as a run folder, or export a run to their layout",
        description="Import: dlmoe convert CHECKPOINT_DIR --out RUN_DIR (then sample / eval / retrofit / finetune "
        "work on RUN_DIR). Export: dlmoe convert RUN_DIR --export {lladamoe,llada2_moe} --out DIR.",
    )
    p.add_argument("source", help="a checkpoint folder (config.json + safetensors) or, with --export, a run folder")
    p.add_argument("--out", required=True, help="the new run folder (import) or checkpoint folder (export)")
    p.add_argument("--export", choices=("lladamoe", "llada2_moe"), help="write the run's model in this layout")
    p.add_argument("--block-size", type=int, default=32, help="LLaDA2 attention block (default 32, its sampler's)")
    p.add_argument("--mask-id", type=int, help="mask token id, when neither config.json nor tokenizer.json has it")
    p.add_argument(
        "--dtype", choices=DTYPES, default="keep",
        help="stored weight dtype of the import: keep = the checkpoint's (default), bf16, fp32, or auto = what "
        "this machine computes in fast (bf16 on CUDA / AVX512-BF16 / AMX CPUs, else fp32)",
    )  # fmt: skip
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="export shard size (default 5 GB)")
    p.set_defaults(func=convert)


def convert(args: argparse.Namespace) -> None:
    from dlmoe.model.convert import CheckpointError, export_checkpoint, import_checkpoint
    from dlmoe.model.convert.run_folder import imported_record, write_run_folder

    if args.block_size < 1:
        raise ValueError(f"--block-size must be a positive integer, got {args.block_size}")
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    source = Path(args.source)
    if args.export is None:
        # an explicit bf16 is a storage choice here (half the disk), not a compute one: no emulation warning
        dtype = resolve_precision("auto", _local_device()).dtype if args.dtype == "auto" else STORAGE_DTYPES[args.dtype]
        imported = import_checkpoint(source, dtype=dtype, block_size=args.block_size, mask_id=args.mask_id)
        run = write_run_folder(imported, source, args.out)
        print(json.dumps({"imported": str(source), "format": imported.format, "run_dir": str(run)}))
        return
    from dlmoe.inference import load_run

    if not (source / "model" / "config.json").is_file():
        raise CheckpointError(f"--export needs a run folder (with model/config.json), got {str(source)!r}")
    _, model, _ = load_run(source)
    record = imported_record(source)
    source_config = record["source_config"] if record and record["format"] == args.export else None
    out = export_checkpoint(
        model, args.out, format=args.export, source_config=source_config, max_shard_bytes=int(args.max_shard_gb * 2**30)
    )
    tokenizer_dir = source / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").is_file():  # a checkpoint travels with its tokenizer (and mask token)
        for file in tokenizer_dir.iterdir():
            if file.is_file():
                shutil.copyfile(file, out / file.name)
    print(json.dumps({"exported": str(source), "format": args.export, "out": str(out)}))


def _local_device() -> str:
    """Where this machine would run the import: what `auto` resolves against."""
    return resolve_device("auto").type
