"""lm-evaluation-harness adapter (optional extra: `pip install -e .[eval]`).

Importing this module registers the lm-eval model name "dlmoe"; nothing else in dlmoe imports it,
so dlmoe works without lm-eval installed.

    import lm_eval
    import dlmoe.eval.lm_eval_adapter  # noqa: F401  (registers "dlmoe")
    lm_eval.simple_evaluate(model="dlmoe", model_args="run=runs/demo,mc_num=32", tasks=["arc_easy"])

loglikelihood: the MC-ELBO of the continuation (`mc_num` stratified samples, LLaDA's estimator);
    is_greedy is the cheap single-forward check (every continuation token masked, does the argmax
    reproduce them all?), LLaDA unmasks one token per forward instead; `check_greedy=False` skips
    it and reports False. An empty context is replaced by the EOS token (lm-eval's prefix token).
loglikelihood_rolling: the ELBO bound of the whole string, chunks of `max_length` tokens scored
    unconditionally (as `dlmoe.eval.text_elbo`).
generate_until: `dlmoe.sampling.generate` with `sampler` (a `SamplerConfig`: cache, threshold, CFG,
    block routing, capacity, suppression, ...; default: the plain LLaDA sampler), greedy unless
    gen_kwargs give a temperature, one token per step by default, cut at EOS and at the first stop
    string. Per request the lengths, steps and temperature are set: `max_gen_toks` is rounded up to
    a multiple of `block_length` and capped so that generation fits in max_seq_len. Without
    arguments these come from `sampler` (gen_length, block_length, steps / gen_length; no steps:
    adaptive, its threshold), else 64, 32 and 1.0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own model names first: it skips them once its registry is non-empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dlmoe._checks import check_float, check_int
from dlmoe.eval.encoding import encode_pair, text_encoder
from dlmoe.eval.likelihood import diffusion_transformer, eval_mode, greedy_matches, mc_log_likelihood
from dlmoe.sampling import SamplerConfig, generate
from dlmoe.sampling.config import sampler_from_keywords


@register_model("dlmoe")
class DlmoeLM(LM):
    """A trained dlmoe run (`run=RUN_DIR`) or a (model, tokenizer) pair as an lm-eval model."""

    def __init__(
        self,
        run: str | None = None,
        *,
        model: object = None,
        tokenizer: object = None,
        mc_num: int = 32,
        batch_size: int | str | None = 16,
        seed: int = 0,
        check_greedy: bool = True,
        max_length: int | None = None,
        sampler: SamplerConfig | None = None,
        max_gen_toks: int | None = None,
        block_length: int | None = None,
        steps_per_token: float | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,  # accepted for lm-eval's generic arguments; not used
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, max_length = _resolve_model(run, model, tokenizer, max_length)
        self.transformer = diffusion_transformer(self.model)
        self.config = self.transformer.config
        self.mc_num = check_int("mc_num", mc_num, low=1)
        self.batch_size = check_int("batch_size", _batch_size(batch_size), low=1)
        self.seed = check_int("seed", seed)
        if not isinstance(check_greedy, bool):
            raise ValueError(f"check_greedy must be a bool, got {check_greedy!r}")
        self.check_greedy = check_greedy
        self.max_length = check_int("max_length", max_length, low=1, high=self.config.max_seq_len)
        self._init_generation(sampler, max_gen_toks, block_length, steps_per_token)
        if device:
            self.transformer.to(device)
        self._device = next(self.transformer.parameters()).device
        self.encode = text_encoder(self.tokenizer)

    def _init_generation(
        self, sampler: object, max_gen_toks: int | None, block_length: int | None, steps_per_token: float | None
    ) -> None:
        """generate_until's settings: the sampler, and the defaults its per-request lengths and steps take."""
        if sampler is not None and not isinstance(sampler, SamplerConfig):
            raise ValueError(f"sampler must be a SamplerConfig or None, got {type(sampler).__name__}")
        self.sampler = sampler
        if sampler is None:
            gen_length, block, per_token = 64, 32, 1.0
        else:
            gen_length, block = sampler.gen_length, sampler.block_length
            per_token = None if sampler.steps is None else sampler.steps / sampler.gen_length
        self.max_gen_toks = check_int("max_gen_toks", gen_length if max_gen_toks is None else max_gen_toks, low=1)
        self.block_length = check_int("block_length", block if block_length is None else block_length, low=1)
        self.steps_per_token = per_token if steps_per_token is None else steps_per_token
        if self.steps_per_token is not None:  # None: adaptive steps (the sampler's threshold)
            check_float("steps_per_token", self.steps_per_token, low=0.0, high=1.0, low_open=True)

    # ------------------------------------------------------------------ lm-eval API

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(MC-ELBO of continuation | context, greedy check) per request of (context, continuation)."""
        eos = [] if self.config.eos_id is None else [self.config.eos_id]
        pairs = []
        for request in requests:
            context, continuation = request.args[:2]
            prompt, answer = encode_pair(self.encode, context, continuation)
            pairs.append((prompt or eos, answer))
        scored = [i for i, (_, answer) in enumerate(pairs) if answer]  # an empty continuation: log 1 = 0
        results = [(0.0, True)] * len(pairs)
        if scored:
            chosen = [pairs[i] for i in scored]
            estimates = mc_log_likelihood(
                self.model, chosen, mc_num=self.mc_num, batch_size=self.batch_size, seed=self.seed,
                progress=not disable_tqdm,
            )  # fmt: skip
            greedy = (
                greedy_matches(self.model, chosen, batch_size=self.batch_size)
                if self.check_greedy
                else [False] * len(chosen)
            )
            for i, estimate, hit in zip(scored, estimates, greedy, strict=True):
                results[i] = (estimate.log_likelihood, hit)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """ELBO bound of each whole string: consecutive chunks of `max_length` tokens."""
        pairs, owners = [], []
        for index, request in enumerate(requests):
            ids = self.encode(request.args[0])
            for start in range(0, len(ids), self.max_length):
                pairs.append(([], ids[start : start + self.max_length]))
                owners.append(index)
        totals = [0.0] * len(requests)
        if pairs:
            estimates = mc_log_likelihood(
                self.model, pairs, mc_num=self.mc_num, batch_size=self.batch_size, seed=self.seed,
                progress=not disable_tqdm,
            )  # fmt: skip
            for owner, estimate in zip(owners, estimates, strict=True):
                totals[owner] += estimate.log_likelihood
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Text generated after each context, cut at the first stop string of its `until`."""
        groups: dict[tuple, list[int]] = defaultdict(list)  # same generation settings → one batch
        settings = [self._gen_settings(request.args[1] if len(request.args) > 1 else {}) for request in requests]
        for index, setting in enumerate(settings):
            groups[(setting["gen_length"], setting["block_length"], setting["temperature"])].append(index)
        outputs = [""] * len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], settings[chunk[0]])
                for i, text in zip(chunk, texts, strict=True):
                    outputs[i] = _cut(text, settings[i]["until"])
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs

    # ------------------------------------------------------------------ generation

    def _gen_settings(self, gen_kwargs: dict) -> dict:
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until arguments must be (context, dict), got {type(gen_kwargs).__name__}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        want = check_int("max_gen_toks", gen_kwargs.get("max_gen_toks", self.max_gen_toks), low=1)
        default_temperature = 0.0 if self.sampler is None else self.sampler.temperature
        temperature = gen_kwargs.get("temperature")
        temperature = default_temperature if temperature is None else float(temperature)
        temperature = check_float("temperature", temperature, low=0.0)
        block = min(self.block_length, want)
        room = (self.config.max_seq_len - 1) // block * block  # leave at least one prompt token
        if room < 1:
            raise ValueError(f"block_length={block} leaves no room in max_seq_len={self.config.max_seq_len}")
        gen_length = min(math.ceil(want / block) * block, room)
        return {"until": until, "gen_length": gen_length, "block_length": block, "temperature": temperature}

    def _generate(self, contexts: list[str], setting: dict) -> list[str]:
        sampler = self._request_sampler(setting)
        eos = sampler.eos_id
        keep = self.config.max_seq_len - setting["gen_length"]
        prompts = [(self.encode(c) or ([eos] if eos is not None else self.encode(" ")))[-keep:] for c in contexts]
        with eval_mode(self.transformer):
            result = generate(self.model, prompts, sampler, generator=torch.Generator().manual_seed(self.seed))
        texts = []
        for row in result.generated.tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def _request_sampler(self, setting: dict) -> SamplerConfig:
        """The sampler with one request's lengths, steps and temperature; stops at EOS (cut there anyway)."""
        gen_length, block = setting["gen_length"], setting["block_length"]
        steps = None
        if self.steps_per_token is not None:
            steps = max(1, round(block * self.steps_per_token)) * (gen_length // block)
        eos = self.config.eos_id if self.sampler is None or self.sampler.eos_id is None else self.sampler.eos_id
        request = dict(
            gen_length=gen_length, block_length=block, steps=steps, temperature=setting["temperature"], eos_id=eos,
            stop_at_eos=eos is not None,
        )  # fmt: skip
        return sampler_from_keywords(None, request, "generate_until", base=self.sampler)


def _cut(text: str, until: list[str]) -> str:
    """`text` up to the earliest stop string."""
    positions = [text.find(stop) for stop in until if stop]
    positions = [p for p in positions if p >= 0]
    return text[: min(positions)] if positions else text


def _batch_size(value: object) -> object:
    """lm-eval passes ints, numeric strings, None or "auto[:N]" (no auto sizing here: 16)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 16
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _resolve_model(run: str | None, model: object, tokenizer: object, max_length: int | None) -> tuple:
    if (run is None) == (model is None):
        raise ValueError("give exactly one of run=RUN_DIR or model= (with tokenizer=)")
    if run is not None:
        from dlmoe.inference import load_run

        config, model, tokenizer = load_run(Path(str(run)))
        return model, tokenizer, max_length or config.data.seq_len
    if tokenizer is None:
        raise ValueError("model= needs tokenizer= as well")
    return model, tokenizer, max_length or diffusion_transformer(model).config.max_seq_len
