"""The training loop: owns optimizer, LR schedule, precision, checkpoints and logging.

One optimizer step:
  1. for each of `grad_accum` micro-batches: `diffusion.diffusion_loss` (noise t_b ~
     U[mask_ratio_min, mask_ratio_max], mask → forward under autocast → ELBO / stable / masked_mean)
     + router aux/z losses → backward;
  2. clip gradients, AdamW step, LR schedule step;
  3. loss-free expert-bias update (once per optimizer step);
  4. log, evaluate, checkpoint on their intervals.
A block-causal model (`model.attention="block_causal"`) trains on two streams [x_t ; x_0]
(block diffusion, BD3-LM / LLaDA2): each noisy block sees the clean earlier blocks, as in sampling
with the exact cache, and validation measures the ELBO of that block-wise denoiser.
Noise comes from a dedicated generator saved with the checkpoint, so a resumed run repeats the
uninterrupted run's losses exactly. `train.init_from` starts a run from a finished run's weights and
tokenizer (fine-tuning; see `init_from.py`); validation always reports the ELBO over t ~ U(0, 1)
(`diffusion.validation_elbo`, the evaluator `dlmoe eval --validation` uses too).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dlmoe._fs import atomic_write_json, remove_stale_scratch
from dlmoe.config import RunConfig
from dlmoe.config_io import read_saved_run_config, save_run_config
from dlmoe.diffusion.objective import ObjectiveOutput, diffusion_loss
from dlmoe.diffusion.validation import NUM_BINS, validation_elbo
from dlmoe.model.flops import model_size
from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM
from dlmoe.precision import resolve_precision
from dlmoe.routing.routers import update_expert_biases
from dlmoe.runtime import resolve_device, tune_cpu_malloc
from dlmoe.train.checkpoint import capture_rng_state, latest_checkpoint, restore_rng_state
from dlmoe.train.data_setup import RunData, check_corpus, prepare_data
from dlmoe.train.distributed import LocalRuntime
from dlmoe.train.init_from import SourceRun
from dlmoe.train.metrics import MetricsLog, plot_losses, routing_summary
from dlmoe.train.run_folder import (
    RunLock,
    changed_keys,
    check_resume_config,
    clear_run,
    holds_run,
    record_launch,
    remove_if_only_lock,
)
from dlmoe.train.schedule import build_lr_schedule, lr_multiplier

__all__ = ["NUM_BINS", "TrainSummary", "Trainer", "TrainingError"]  # NUM_BINS: kept for older imports


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclass
class TrainSummary:
    run_dir: Path
    steps: int
    final_loss: float
    val_loss: float
    val_bits_per_byte: float
    tokens_per_s: float
    wall_s: float


class Trainer:
    """Train a MoE diffusion LM from a `RunConfig`; `resume=True` continues from the latest checkpoint.

    With `train.init_from` (and no checkpoint to resume) the model starts from that run's weights.
    `runtime`: a `DistributedRuntime` for a rank of a torchrun world (default: one process)."""

    def __init__(
        self,
        config: RunConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        runtime: LocalRuntime | None = None,
    ) -> None:
        if resume and overwrite:
            raise ValueError("--resume continues a run and --overwrite starts it over; pass one of them")
        self.run_dir = Path(config.run_dir)
        self.runtime = runtime = runtime or LocalRuntime()
        runtime.check_config(config)  # before anything is written
        self.progress = progress and runtime.is_main
        if config.train.batch_size % runtime.world_size:
            raise ValueError(
                f"train.batch_size={config.train.batch_size} (the global batch) is not divisible by the world size "
                f"{runtime.world_size}; allowed: a multiple of {runtime.world_size}"
            )
        self.device = runtime.device or resolve_device(config.train.device)
        self.precision = resolve_precision(config.train.dtype, self.device)
        source = None
        if config.train.init_from is not None and not resume:
            source = SourceRun.open(config.train.init_from)
            source.check_target(config, self.run_dir)  # before anything is written
        check_corpus(config)  # a corpus that cannot be split is refused before the run folder is touched
        created = not self.run_dir.exists()
        try:
            self.checkpoint = runtime.on_main(lambda: self._open_run_folder(config, resume, overwrite))
            self._setup(config, source)
        except BaseException:
            self.close()
            if created and runtime.is_main:  # nothing of a run was written: leave no empty folder behind
                remove_if_only_lock(self.run_dir)
            raise

    def _open_run_folder(self, config: RunConfig, resume: bool, overwrite: bool) -> Path | None:
        """Lock the run folder, then check that this launch may write there: `resume` needs a valid
        checkpoint and settings that can be applied to it; a fresh run needs a folder holding no
        run, or `overwrite` (which clears it). Returns the checkpoint to resume from."""
        if resume and not self.run_dir.is_dir():
            raise ValueError(f"--resume: run folder {str(self.run_dir)!r} does not exist")
        self._lock = RunLock(self.run_dir).acquire()
        remove_stale_scratch(self.run_dir)
        if resume:
            if not holds_run(self.run_dir):
                raise ValueError(f"--resume: {str(self.run_dir)!r} holds no run to continue (no valid checkpoint)")
            path = latest_checkpoint(self.run_dir)
            if path is None:
                raise ValueError(f"--resume: no valid checkpoint under {str(self.run_dir / 'checkpoints')!r}")
            saved = read_saved_run_config(self.run_dir / "config.json")
            step = int(path.name.removeprefix("step_"))
            check_resume_config(saved, config, checkpoint_step=step)
            changed = changed_keys(saved, config)
            if changed:
                self._say(f"resuming at step {step} with: {', '.join(changed)}")
            return path
        if holds_run(self.run_dir) and not overwrite:
            raise ValueError(
                f"run folder {str(self.run_dir)!r} already holds a run; pass --resume to continue it, "
                "--overwrite to delete it and start over, or choose another run_dir"
            )
        removed = clear_run(self.run_dir) if overwrite else []
        if removed:
            self._say(f"--overwrite: removed {', '.join(removed)} from {self.run_dir}")
        return None

    def _setup(self, config: RunConfig, source: SourceRun | None) -> None:
        runtime = self.runtime
        tune_cpu_malloc()
        if config.train.threads is not None:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.train.seed)
        if self.checkpoint is not None:
            source = None  # a resumed fine-tune reads its own checkpoint, never the source
        tokenizer_from = source.tokenizer_dir if source is not None else None
        with runtime.main_first():  # rank 0 trains the tokenizer and fills the token cache
            self.data: RunData = prepare_data(config, self.run_dir, tokenizer_from=tokenizer_from)
        if max(len(b) for b in self.data.validation_batches) < runtime.world_size:
            raise ValueError(
                f"the validation split has fewer rows than the {runtime.world_size} ranks; raise "
                "data.validation_fraction or train.eval_batches, or launch fewer processes"
            )
        mask_id, eos_id, pad_id = self.data.special_ids
        vocab_size = len(self.data.tokenizer)
        if source is not None:  # the source's embedding rows and ids decide (an imported model pads its vocab)
            weights = source.config.model
            vocab_size, mask_id, eos_id, pad_id = weights.vocab_size, weights.mask_id, weights.eos_id, weights.pad_id
            if len(self.data.tokenizer) > vocab_size:
                raise ValueError(
                    f"the tokenizer of train.init_from has {len(self.data.tokenizer)} tokens, more than the model's "
                    f"{vocab_size} embedding rows"
                )
        model_config = replace(config.model, vocab_size=vocab_size, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id)
        self.config = replace(config, model=model_config)
        if runtime.is_main:
            save_run_config(self.config, self.run_dir / "config.json")
            resumed_from = int(self.checkpoint.name.removeprefix("step_")) if self.checkpoint else None
            record_launch(self.run_dir, resumed_from, self.device, self.precision, runtime.world_size)
            self._say(f"{self.run_dir}: {self.precision.name} on {self.device} ({self.precision.reason})")
        # A fresh model: every rank builds all of it on the CPU from the same seed (parallelising keeps
        # each rank's part, then moves it to the device). A fine-tune: built on the meta device, and
        # after the experts are sharded each rank reads only its part of the source's weights.
        hf_config = DlmoeConfig.from_model_config(model_config)
        if source is None:
            model, load = DlmoeForDiffusionLM(hf_config), None
        else:
            with torch.device("meta"):
                model = DlmoeForDiffusionLM(hf_config)
            load = source.load_weights
        self.model = runtime.setup(model, self.device, load)
        self.optimizer = self._build_optimizer()
        self.scheduler = build_lr_schedule(self.optimizer, self.config.train)
        self.noise_generator = torch.Generator().manual_seed(config.train.seed + 1)
        self.step = 0
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        self.metrics = (
            MetricsLog(self.run_dir, resume_step=self.step if self.checkpoint else None) if runtime.is_main else None
        )
        # two streams: every training token is fed twice, against 2L keys
        streams = 2 if model_config.block_causal else 1
        self.flops_per_token = streams * model_size(model_config, streams * config.data.seq_len).forward_flops_per_token

    def _say(self, message: str) -> None:
        """One line on stderr (main rank), above the progress bar."""
        if self.runtime.is_main:
            tqdm.write(f"dlmoe: {message}", file=sys.stderr)

    def close(self) -> None:
        """Release the run folder (also done when the process exits)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # no weight decay on norms, biases and router/embedding-free vectors (1-D parameters)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        t = self.config.train
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=False)

    def _state(self) -> dict:
        """Everything but the model and the optimizer (saved by the runtime: whole or sharded)."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.train_batches.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "rng": capture_rng_state(),
        }

    def _restore(self, path: Path) -> None:
        state = self.runtime.load_checkpoint(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.train_batches.load_state_dict(state["data"])
        self.noise_generator.set_state(state["noise_generator"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self._apply_optimizer_settings()

    def _apply_optimizer_settings(self) -> None:
        """The config's lr, betas and weight decay over what the checkpoint restored: a resume that
        changes them trains with the new values (unchanged ones give the same numbers bit for bit)."""
        t = self.config.train
        self.scheduler.base_lrs = [t.lr for _ in self.optimizer.param_groups]
        multiplier = lr_multiplier(self.scheduler.last_epoch, t)
        for group, decay in zip(self.optimizer.param_groups, (t.weight_decay, 0.0), strict=True):
            group["initial_lr"] = t.lr
            group["lr"] = t.lr * multiplier
            group["weight_decay"] = decay
            group["betas"] = (t.beta1, t.beta2)

    def _forward(self, noisy_ids: torch.Tensor, **inputs: torch.Tensor):
        """The model's forward under this run's autocast (bf16 only where native)."""
        bf16 = self.precision.name == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.runtime.forward_module(noisy_ids, **inputs)

    def _loss(
        self, batch: torch.Tensor, generator: torch.Generator, weighting: str | None = None, *, validation: bool = False
    ) -> ObjectiveOutput:
        """(diffusion loss, router aux loss, dispatches, the noised batch) of one batch (this rank's rows).

        Training noise uses the configured t range; `validation` uses U(0, 1), what the ELBO integrates over."""
        train = self.config.train
        return diffusion_loss(
            self._forward,
            batch,
            mask_id=self.config.model.mask_id,
            two_stream=self.config.model.block_causal,
            generator=generator,
            t_min=0.0 if validation else train.mask_ratio_min,
            t_max=1.0 if validation else train.mask_ratio_max,
            antithetic=train.antithetic,
            weighting=weighting or train.loss_weighting,
            rows=self.runtime.local_rows,
            device=self.device,
        )

    def train_step(self, *, routing_stats: bool = True) -> dict[str, float]:
        """One optimizer step (with gradient accumulation); returns its metrics row.

        `routing_stats` adds the last micro-batch's load-balance figures (costs a device sync)."""
        t = self.config.train
        self.model.train()
        start = time.perf_counter()
        total = aux_total = 0.0
        dispatches: list = []
        runtime = self.runtime
        for micro in range(t.grad_accum):
            batch = next(self.data.train_batches)
            with runtime.gradient_sync(micro == t.grad_accum - 1):  # dense gradients sync on the last one
                diff, aux, dispatches, _ = self._loss(batch, self.noise_generator)
                loss = diff.loss
                ((loss + aux) / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
            aux_total += float(aux.detach()) / t.grad_accum
        runtime.finish_gradients()
        total, aux_total = runtime.mean([total, aux_total])
        if not math.isfinite(total):
            raise TrainingError(
                f"non-finite loss ({total}) at step {self.step + 1}; stopping. "
                f"The last good checkpoint is kept under {self.run_dir / 'checkpoints'}"
            )
        grad_norm = runtime.clip_grad_norm_(self.model, t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        update_expert_biases(self.model, runtime.reduce_counts)
        self.step += 1
        elapsed = time.perf_counter() - start
        tokens = t.batch_size * t.grad_accum * self.config.data.seq_len
        row = {
            "step": self.step,
            "loss": total,
            "aux_loss": aux_total,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / elapsed,
            "step_s": elapsed,
            "active_flops_per_token": self.flops_per_token,
        }
        return row | routing_summary(dispatches) if routing_stats else row

    def evaluate(self) -> dict[str, float]:
        """Validation ELBO (nats/token, always 1/r-weighted over t ~ U(0, 1), fixed noise), bits per byte,
        and the mean masked-token CE per mask-ratio bin (written to `val_bins.json`): `validation_elbo`."""
        self.model.eval()
        model = self.config.model
        result = validation_elbo(
            self._forward,
            self.data.validation_batches,
            mask_id=model.mask_id,
            two_stream=model.block_causal,
            antithetic=self.config.train.antithetic,
            device=self.device,
            runtime=self.runtime,
        )
        if self.runtime.is_main:
            atomic_write_json(self.run_dir / "val_bins.json", {"step": self.step, "bins": result.bins}, indent=1)
        return {"val_loss": result.nats_per_token, "val_bits_per_byte": result.bits_per_byte(self.data.bytes_per_token)}

    def fit(self) -> TrainSummary:
        t, runtime = self.config.train, self.runtime
        start, tokens_per_s, last, val = time.perf_counter(), math.nan, {}, {}
        nothing_left = self.step >= t.steps
        if nothing_left:
            self._say(
                f"{self.run_dir} is already at step {self.step} of train.steps={t.steps}: nothing to train "
                "(raise train.steps to continue it)"
            )
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        try:
            with runtime.guard(self.run_dir):
                while self.step < t.steps:
                    log_now = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps
                    row = self.train_step(routing_stats=log_now)
                    tokens_per_s = row["tokens_per_s"]
                    if self.step % t.eval_every == 0 or self.step == t.steps:
                        val = self.evaluate()
                        row |= val
                        log_now = True
                    if log_now and self.metrics is not None:
                        self.metrics.write(row)
                    last = row
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}")
                    if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                        runtime.save_checkpoint(
                            self.run_dir, self.step, self.model, self.optimizer, self._state(), t.keep_last
                        )
                # also when nothing was left: a kill during the last save left the previous model
                runtime.save_model(self.model, self.run_dir / "model", self.data.tokenizer)
                val = val or self.evaluate()
            if runtime.is_main:
                plot_losses(self.metrics.path, self.run_dir / "loss.png")
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            self.close()
        final_loss = last["loss"] if last else (self.metrics.last_loss() if self.metrics is not None else math.nan)
        return TrainSummary(
            self.run_dir,
            self.step,
            final_loss,
            val["val_loss"],
            val["val_bits_per_byte"],
            tokens_per_s,
            time.perf_counter() - start,
        )
