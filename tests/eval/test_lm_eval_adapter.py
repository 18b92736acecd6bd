"""The lm-eval adapter: registered as "dlmoe", runs local jsonl tasks through `lm_eval.simple_evaluate`
(multiple choice, rolling perplexity, generation), and its methods agree with dlmoe's own functions."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dlmoe.eval import encode_pair, greedy_matches, mc_log_likelihood, text_encoder  # noqa: E402
from dlmoe.eval.lm_eval_adapter import DlmoeLM, _cut  # noqa: E402
from dlmoe.sampling import SamplerConfig, generate  # noqa: E402

DOCS = [
    {"question": "The king speaks of", "choices": ["stars and seas", "a dog"], "answer": 0},
    {"question": "The queen answers with", "choices": ["a song", "roses and a song", "seas"], "answer": 1},
    {"question": "Scene", "choices": ["1.", "The king"], "answer": 1},
]

TASKS = """\
task: {name}_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
---
task: {name}_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
---
task: {name}_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


def request(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


@pytest.fixture(scope="module")
def lm(trained_run: Path) -> DlmoeLM:
    return DlmoeLM(run=str(trained_run), mc_num=4, batch_size=8, seed=1, block_length=4, steps_per_token=0.25)


def test_simple_evaluate_on_local_jsonl_tasks(trained_run: Path, tmp_path: Path) -> None:
    import dlmoe.eval.lm_eval_adapter  # noqa: F401  (registers "dlmoe")

    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for index, text in enumerate(TASKS.split("---\n")):
        config = text.format(name="dlmoe_tiny", data=data, cache=tmp_path / "hf_cache")
        (tasks / f"task{index}.yaml").write_text(config)
    results = lm_eval.simple_evaluate(
        model="dlmoe",
        model_args={"run": str(trained_run), "mc_num": 2, "block_length": 4, "steps_per_token": 0.5},
        tasks=["dlmoe_tiny_mcq", "dlmoe_tiny_ppl", "dlmoe_tiny_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=4,
        bootstrap_iters=0,
        log_samples=True,
    )
    scores = results["results"]
    assert 0 <= scores["dlmoe_tiny_mcq"]["acc,none"] <= 1 and 0 <= scores["dlmoe_tiny_mcq"]["acc_norm,none"] <= 1
    assert scores["dlmoe_tiny_ppl"]["bits_per_byte,none"] > 0
    assert 0 <= scores["dlmoe_tiny_gen"]["exact_match,none"] <= 1
    mcq_samples = results["samples"]["dlmoe_tiny_mcq"]
    assert len(mcq_samples) == 3 and len(mcq_samples[1]["resps"]) == 3  # one loglikelihood per choice
    generated = [s["resps"][0][0] for s in results["samples"]["dlmoe_tiny_gen"]]
    assert all("\n" not in g and "." not in g for g in generated)


def test_loglikelihood_is_the_mc_elbo_and_the_greedy_check(lm: DlmoeLM) -> None:
    encode = text_encoder(lm.tokenizer)
    requests = [request("loglikelihood", "The king speaks ", "of stars"), request("loglikelihood", "", "Scene")]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    pairs = [encode_pair(encode, "The king speaks ", "of stars"), ([lm.config.eos_id], encode("Scene"))]
    expected = mc_log_likelihood(lm.model, pairs, mc_num=4, seed=1)
    greedy = greedy_matches(lm.model, pairs)
    assert [r[0] for r in results] == pytest.approx([e.log_likelihood for e in expected])
    assert [r[1] for r in results] == greedy
    assert lm.loglikelihood([request("loglikelihood", "x", "")], disable_tqdm=True) == [(0.0, True)]


def test_loglikelihood_rolling_sums_chunk_bounds(lm: DlmoeLM) -> None:
    text = "The queen answers with roses and a song. " * 4
    [total] = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    ids = text_encoder(lm.tokenizer)(text)
    chunks = [([], ids[i : i + lm.max_length]) for i in range(0, len(ids), lm.max_length)]
    assert len(chunks) > 1 and lm.max_length == 32  # the run's seq_len
    assert total == pytest.approx(sum(e.log_likelihood for e in mc_log_likelihood(lm.model, chunks, mc_num=4, seed=1)))


def test_generate_until_cuts_at_stop_strings(lm: DlmoeLM) -> None:
    requests = [
        request("generate_until", "The king", {"until": ["\n"], "max_gen_toks": 6}),
        request("generate_until", "The queen answers", {"until": "e", "max_gen_toks": 6}),
        request("generate_until", "", {"max_gen_toks": 200}),  # capped to fit max_seq_len
    ]
    outputs = lm.generate_until(requests, disable_tqdm=True)
    assert len(outputs) == 3 and all(isinstance(o, str) for o in outputs)
    assert "\n" not in outputs[0] and "e" not in outputs[1]
    assert _cut("abc. def\nx", ["\n", "."]) == "abc" and _cut("abc", []) == "abc"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give exactly one of run=RUN_DIR or model="),
        ({"run": "x", "model": object()}, "give exactly one of"),
        ({"model": object()}, "needs tokenizer="),
        ({"mc_num": 0}, "mc_num must be >= 1"),
        ({"check_greedy": "yes"}, "check_greedy must be a bool"),
        ({"max_length": 1000}, "max_length must be <= 64"),
        ({"steps_per_token": 0}, "steps_per_token must be in"),
        ({"sampler": {"cache": "dual"}}, "sampler must be a SamplerConfig or None, got dict"),
    ],
)
def test_bad_arguments(trained_run: Path, kwargs, match) -> None:
    if "run" not in kwargs and "model" not in kwargs and kwargs:
        kwargs = {"run": str(trained_run)} | kwargs
    with pytest.raises(ValueError, match=match):
        DlmoeLM(**kwargs)


def test_registered_name() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("dlmoe") is DlmoeLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own names still resolve


@pytest.mark.parametrize(("value", "expected"), [(None, 16), ("auto", 16), ("auto:4", 16), ("4", 4), (3, 3)])
def test_batch_size_forms_lm_eval_passes(trained_run: Path, value, expected) -> None:
    assert DlmoeLM(run=str(trained_run), batch_size=value).batch_size == expected


def test_generate_until_runs_the_sampler_it_was_given(lm: DlmoeLM, trained_run: Path) -> None:
    eos = lm.config.eos_id
    setting = lm._gen_settings({"max_gen_toks": 6})
    # no sampler: LLaDA's, as before (block_length=4, steps_per_token=0.25: one step per block)
    plain = SamplerConfig(gen_length=8, block_length=4, steps=2, temperature=0.0, eos_id=eos, stop_at_eos=True)
    assert lm._request_sampler(setting) == plain
    sampler = SamplerConfig(gen_length=8, block_length=4, threshold=0.5, cache="dual", suppress_tokens=[5])
    fast = DlmoeLM(run=str(trained_run), sampler=sampler, seed=1)
    assert (fast.max_gen_toks, fast.block_length, fast.steps_per_token) == (8, 4, None)  # defaults from the sampler
    want = dataclasses.replace(sampler, temperature=0.0, eos_id=eos, stop_at_eos=True)
    assert fast._request_sampler(fast._gen_settings({"max_gen_toks": 6})) == want
    [text] = fast.generate_until([request("generate_until", "The king", {"max_gen_toks": 6})], disable_tqdm=True)
    ids = generate(fast.model, [fast.encode("The king")], want, generator=torch.Generator().manual_seed(1))
    row = ids.generated[0].tolist()
    assert text == fast.tokenizer.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True)
