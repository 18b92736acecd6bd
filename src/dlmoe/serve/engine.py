"""The model side of the server: check a request's rows, run a batch of jobs as one `generate` call.

Jobs of a batch are concatenated row-wise into one left-padded `generate` call. Rows never interact
in `generate` (padding invariance, tested), so a job's tokens do not depend on its batch-mates — at
temperature 0; sampled jobs draw from the batch's generator (a seeded sampled job runs alone). A
model whose expert-choice router pools the whole batch (`pool="batch"`) makes rows interact: its
jobs always run alone. Everything here runs on the batcher's single worker thread.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from dlmoe.sampling import SamplerConfig, StepInfo, generate
from dlmoe.sampling.denoiser import unwrap_model
from dlmoe.sampling.generate import check_generation
from dlmoe.serve.jobs import Job, Outcome
from dlmoe.serve.protocol import RequestError
from dlmoe.serve.stream import step_events


class Cancelled(Exception):
    """Every job of the running batch was cancelled: `generate` stops at the step that raised."""


class Engine:
    """A loaded model, its tokenizer and the server's default sampler."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, defaults: SamplerConfig, model_id: str) -> None:
        self.model, self.tokenizer, self.defaults, self.model_id = model, tokenizer, defaults, model_id
        self.transformer = unwrap_model(model)
        if self.transformer is None:
            raise ValueError(f"the server needs a dlmoe model, got {type(model).__name__}")
        self.config = self.transformer.config
        router = None if self.config.moe is None else self.config.moe.router
        self.rows_interact = router is not None and getattr(router, "pool", "sequence") == "batch"
        self.device = next(model.parameters()).device
        self._draws = torch.Generator().manual_seed(0)  # seeds for unseeded sampled batches

    @classmethod
    def from_run(
        cls, run_dir: str | Path, defaults: SamplerConfig | None = None, *, device: str = "cpu",
        dtype: torch.dtype | None = None, expert_memory: int | str | None = None,
    ) -> Engine:  # fmt: skip
        """Load `<run_dir>/model` (safetensors only) as `dlmoe sample` does; defaults: the run's `sample` section."""
        from dlmoe.inference import load_run

        config, model, tokenizer = load_run(run_dir, expert_memory=expert_memory)
        return cls(model.to(device=device, dtype=dtype), tokenizer, defaults or config.sample, Path(run_dir).name)

    # ------------------------------------------------------------------ requests

    @property
    def default_guard(self) -> int:
        """Block routing's guard when a request names none: min(E, 2k) (a dense model: 1, refused later)."""
        router = None if self.config.moe is None else self.config.moe.router
        return 1 if router is None else min(router.num_experts, 2 * router.num_experts_per_tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat (the tokenizer's chat template, generation prompt added)."""
        if not self.has_chat_template:
            raise RequestError(
                f"model {self.model_id!r} has no chat template (its tokenizer defines none): use /v1/completions",
                param="messages",
            )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: list[str], sampler: SamplerConfig) -> list[list[int]]:
        """Token ids of each prompt, checked against the model before the request is queued (so that
        a request that cannot run never reaches a batch)."""
        rows = []
        for i, text in enumerate(prompts):
            ids = self.tokenizer.encode(text)
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if not ids:
                raise RequestError(f"{param} encodes to no tokens", param=param)
            if self.config.mask_id in ids:
                raise RequestError(f"{param} holds the mask token (id {self.config.mask_id})", param=param)
            try:
                check_generation(self.model, [ids], sampler)
            except ValueError as error:
                raise RequestError(str(error), param=_param(str(error), param)) from None
            rows.append(ids)
        return rows

    # ------------------------------------------------------------------ batches

    def run_batch(self, jobs: list[Job]) -> list[Outcome]:
        """One `generate` call for `jobs` (same sampler); a failing batch is retried job by job, so a
        failing request never takes its batch-mates down."""
        try:
            return self._generate(jobs)
        except Cancelled:
            return [Outcome(cancelled=True, status=499, error="cancelled") for _ in jobs]
        except Exception as error:  # reported to the request; the server keeps serving
            if len(jobs) > 1:
                return [dataclasses.replace(self.run_batch([job])[0], retried_alone=True) for job in jobs]
            return [Outcome(status=500, error=f"generation failed: {type(error).__name__}: {error}")]

    def _generate(self, jobs: list[Job]) -> list[Outcome]:
        sampler = jobs[0].sampler  # a batch's jobs share it (`Job.batch_key`)
        rows = [ids for job in jobs for ids in job.prompt_ids]
        seed = jobs[0].seed if len(jobs) == 1 and jobs[0].seed is not None else self._next_seed()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for job in jobs:
            job.post({"event": "start", "gen_length": sampler.gen_length, "block_length": sampler.block_length,
                      "num_blocks": sampler.gen_length // sampler.block_length, "steps": sampler.steps,
                      "rows": job.rows, "batch_rows": len(rows)})  # fmt: skip
        result = generate(self.model, rows, sampler, generator=generator, callback=self._callback(jobs))
        outcomes, row = [], 0
        for job in jobs:
            texts, reasons, counts = [], [], []
            for ids in result.generated[row : row + job.rows].tolist():
                text, reason, count = self._decode(ids, sampler)
                texts.append(text), reasons.append(reason), counts.append(count)
            row += job.rows
            outcomes.append(Outcome(texts, reasons, counts, result.stats, batch_rows=len(rows)))
        return outcomes

    def _callback(self, jobs: list[Job]):
        """The per-step hook: stop when every job is cancelled; stream the steps to the jobs that stream."""
        streaming = [(job, sum(j.rows for j in jobs[:i])) for i, job in enumerate(jobs) if job.stream]

        def on_step(info: StepInfo) -> None:
            if all(job.cancelled for job in jobs):
                raise Cancelled
            if streaming:
                step_events(info, streaming, self.tokenizer)

        return on_step

    def _decode(self, ids: list[int], sampler: SamplerConfig) -> tuple[str, str, int]:
        """(text, finish reason, generated token count) of a row; with stop_at_eos the text ends before EOS."""
        eos = self.config.eos_id if sampler.eos_id is None else sampler.eos_id
        if sampler.stop_at_eos and eos in ids:
            ids = ids[: ids.index(eos)]
            return self.tokenizer.decode(ids), "stop", len(ids) + 1
        return self.tokenizer.decode(ids), "length", len(ids)

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._draws))


def _param(message: str, prompt_param: str) -> str:
    """The request field a model check's message is about (`block_routing.guard`, `capacity.k_max`
    when it names the option, as the request's own checks do)."""
    option = re.search(r"\b(block_routing|capacity)\.\w+", message)
    if option is not None:
        return option.group(0)
    pairs = (("max_seq_len", prompt_param), ("gen_length", "max_tokens"), ("block_routing", "block_routing"),
             ("capacity", "capacity"), ("cache", "cache"), ("suppress", "suppress_tokens"))  # fmt: skip
    for needle, param in pairs:
        if needle in message:
            return param
    return prompt_param
