"""Streaming that fits diffusion: after every denoising step, the positions each row committed and
their tokens (a canvas fills in any order, so there is no text delta to append), optionally with
the experts the current block used per MoE layer; then the final text and the generation's stats.

Event payloads (the `dlmoe` field of each SSE chunk, see `dlmoe.serve.app`):
  start: gen_length, block_length, num_blocks, steps (null with a threshold: adaptive), rows (this
         job's), batch_rows (the whole generate call's); sent again when a failed batch is retried alone
  step:  index (the job's row), step, block, block_step, num_blocks, positions (0-based in the
         generation), tokens, token_texts (each token decoded alone: a character split over several
         byte tokens shows as U+FFFD until the final text), finished (stopped at EOS), and with return_routing
         `routing`: {layers, experts, load [layers][experts] slots of the block's tokens,
         coreset [layers][experts] bool | null, votes [layers][experts] | null}
  done:  the final text, finish_reason and stats (carried by `dlmoe.serve.jobs.Outcome`)
"""

from __future__ import annotations

from typing import Any

from dlmoe.sampling import StepInfo
from dlmoe.serve.jobs import Job


def step_events(info: StepInfo, streaming: list[tuple[Job, int]], tokenizer: object) -> None:
    """Post one `step` event per row of every streaming job (`(job, first row of the job in the batch)`)."""
    start = info.gen_start
    committed, tokens = info.committed[:, start:], info.tokens[:, start:]
    routing = _routing_rows(info) if any(job.return_routing for job, _ in streaming) else None
    for job, offset in streaming:
        if job.cancelled:
            continue
        for index in range(job.rows):
            row = offset + index
            positions = committed[row].nonzero().squeeze(1).tolist()
            ids = tokens[row, positions].tolist()
            event: dict[str, Any] = {
                "event": "step", "index": index, "step": info.step, "block": info.block,
                "block_step": info.block_step, "num_blocks": info.num_blocks, "positions": positions,
                "tokens": ids, "token_texts": [tokenizer.decode([t]) for t in ids],
                "finished": bool(info.finished[row]),
            }  # fmt: skip
            if job.return_routing:
                event["routing"] = None if routing is None else routing[row]
            job.post(event)


def _routing_rows(info: StepInfo) -> list[dict[str, Any]] | None:
    """Per row of the batch: the current block's expert load per layer (and coreset / votes with
    block routing); None for a model without routed experts."""
    routing = getattr(info, "routing", None)
    if routing is None:
        return None
    load = routing.expert_load().tolist()
    coreset, votes = routing.coreset(), routing.votes()
    coreset = None if coreset is None else coreset.tolist()
    votes = None if votes is None else votes.double().round(decimals=4).tolist()  # float64: no noise digits
    return [
        {
            "layers": routing.num_layers,
            "experts": routing.num_experts,
            "load": load[row],
            "coreset": None if coreset is None else coreset[row],
            "votes": None if votes is None else votes[row],
        }
        for row in range(len(load))
    ]
