"""`SamplerConfig`: the config form of `generate` gives the keyword form's tokens exactly, it is
YAML-able (and a run's `sample` section is one), and bad options are refused by name."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from dlmoe.config import BlockRoutingConfig, RunConfig, SampleConfig
from dlmoe.config_io import load_run_config, run_config_from_dict, run_config_to_dict
from dlmoe.sampling import CapacityPolicy, SamplerConfig, StepInfo, generate
from tests.sampling import test_fast_sampling as fast
from tests.sampling.test_llada_loop import EOS, MASK, TableModel, _prompt

# ----------------------------------------------------------------------------- config form == keyword form

TABLE_OPTIONS = [
    dict(steps=8),
    dict(steps=4, temperature=0.9),
    dict(steps=8, remasking="random", temperature=0.5),
    dict(threshold=0.3),
    dict(steps=8, eos_id=EOS, stop_at_eos=True, suppress_commit_tokens=[0, 1]),
    dict(steps=4, suppress_tokens=[4], pad_id=3),
]


@pytest.mark.parametrize("options", TABLE_OPTIONS)
def test_config_form_equals_keyword_form_on_a_callable(options: dict) -> None:
    kw = dict(gen_length=8, block_length=4, mask_id=MASK) | options
    infos: dict[str, list[StepInfo]] = {"keywords": [], "config": []}
    old = generate(
        TableModel(), _prompt(), generator=torch.Generator().manual_seed(3), callback=infos["keywords"].append, **kw
    )
    new = generate(
        TableModel(), _prompt(), SamplerConfig(**kw), generator=torch.Generator().manual_seed(3),
        callback=infos["config"].append,
    )  # fmt: skip
    assert torch.equal(old.tokens, new.tokens) and old.stopped_early == new.stopped_early
    assert [i.committed.tolist() for i in infos["keywords"]] == [i.committed.tolist() for i in infos["config"]]


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("token_choice", dict(cache="dual", block_routing=BlockRoutingConfig(top_p=0.5, guard=3))),
        ("token_choice", dict(cache="prefix", cfg_scale=1.5, temperature=0.8)),
        ("expert_choice", dict(threshold=0.3, steps=None, capacity=CapacityPolicy("linear", k_min=1, k_max=6))),
        ("token_choice", dict(stop_at_eos=True, suppress_tokens=[5, 6])),
    ],
)
def test_config_form_equals_keyword_form_on_a_dlmoe_model(kind: str, options: dict) -> None:
    m = fast.model(kind)
    kw = dict(gen_length=8, block_length=4, steps=8) | options
    old = generate(m, fast.PROMPTS, generator=torch.Generator().manual_seed(1), **kw)
    new = generate(m, fast.PROMPTS, SamplerConfig(**kw), generator=torch.Generator().manual_seed(1))
    assert torch.equal(old.tokens, new.tokens)
    assert old.stats.num_forwards == new.stats.num_forwards and old.stats.tokens_fed == new.stats.tokens_fed


def test_a_runs_sample_section_is_a_sampler() -> None:
    section = SampleConfig(prompt="x", gen_length=8, block_length=4, steps=8, temperature=0.7)
    assert isinstance(section, SamplerConfig)
    m = fast.model()
    got = generate(m, fast.PROMPTS, section, generator=torch.Generator().manual_seed(2))
    want = generate(
        m,
        fast.PROMPTS,
        gen_length=8,
        block_length=4,
        steps=8,
        temperature=0.7,
        generator=torch.Generator().manual_seed(2),
    )
    assert torch.equal(got.tokens, want.tokens)


# ----------------------------------------------------------------------------- YAML, saved runs


def test_yaml_round_trip_keeps_every_field() -> None:
    sampler = SamplerConfig(
        gen_length=16, block_length=4, steps=None, temperature=0.5, remasking="random", threshold=0.9, cache="dual",
        cfg_scale=1.0, block_routing=BlockRoutingConfig(top_p=0.5, guard=3),
        capacity=CapacityPolicy("cosine", k_min=1, k_max=4), mask_id=5, eos_id=6, pad_id=7, stop_at_eos=True,
        suppress_tokens=[1, 2], suppress_commit_tokens=[3],
    )  # fmt: skip
    text = OmegaConf.to_yaml(OmegaConf.structured(sampler))
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SamplerConfig), OmegaConf.create(text)))
    assert back == sampler and type(back) is SamplerConfig


def test_run_config_sample_section_round_trips_and_old_sections_load() -> None:
    config = load_run_config(None, ["sample.cache=dual", "sample.capacity.schedule=linear", "sample.capacity.k_min=1",
                                    "sample.capacity.k_max=2", "sample.suppress_tokens=[1,2]"])  # fmt: skip
    assert config.sample.capacity == CapacityPolicy("linear", k_min=1, k_max=2) and config.sample.cache == "dual"
    saved = json.loads(json.dumps(run_config_to_dict(config)))
    assert run_config_from_dict(saved) == config
    # a config.json written before the sampler options existed: its 7 sample fields, the rest default
    old = {"prompt": "Hi", "num_samples": 3, "gen_length": 32, "block_length": 16, "steps": 32, "temperature": 0.8,
           "remasking": "random"}  # fmt: skip
    saved["sample"] = old
    loaded = run_config_from_dict(saved).sample
    assert dataclasses.asdict(loaded) == dataclasses.asdict(SampleConfig(**old))
    assert loaded.cache == "none" and loaded.threshold is None and loaded.suppress_tokens is None
    assert RunConfig().sample == SampleConfig() and SampleConfig().steps == 64 and SampleConfig().gen_length == 64


def test_a_sample_section_checks_lengths_when_sampled_from() -> None:
    section = SampleConfig(gen_length=30, block_length=8)  # readable (a caller may still change the lengths)
    with pytest.raises(ValueError, match="sample.gen_length=30 must be a multiple of block_length=8"):
        generate(TableModel(), _prompt(), section)
    with pytest.raises(ValueError, match="sample.num_samples must be >= 1"):
        SampleConfig(num_samples=0)
    with pytest.raises(ValueError, match="sample.cache must be one of"):
        SampleConfig(cache="full")


def test_importing_the_run_config_stays_light() -> None:
    code = (
        "import sys, dlmoe.config as c, dlmoe.sampling.config as s\n"
        "assert issubclass(c.SampleConfig, s.SamplerConfig)\n"
        "assert 'transformers' not in sys.modules and 'dlmoe.model' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- bad input

GOOD = dict(gen_length=8, block_length=4, steps=4)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(gen_length=0), "sampler.gen_length must be >= 1"),
        (dict(block_length=3), "sampler.gen_length=8 must be a multiple of block_length=3"),
        (dict(steps=None), r"sampler.steps is required without a threshold"),
        (dict(steps=3), r"sampler.steps=3 must be a multiple of the number of blocks \(gen_length // block_length"),
        (dict(steps=16), "sampler.steps must be <= 8"),
        (dict(temperature=-1.0), r"sampler.temperature must be in \[0.0, inf\]"),
        (dict(remasking="top_k"), r"sampler.remasking must be one of \['low_confidence', 'random'\]"),
        (dict(threshold=0.0), r"sampler.threshold must be in \(0.0, 1.0\]"),
        (dict(cache="full"), r"sampler.cache must be one of \['none', 'prefix', 'dual', 'exact'\]"),
        (dict(cfg_scale=-0.5), "sampler.cfg_scale must be in"),
        (dict(block_routing={"top_p": 0.5}), "sampler.block_routing must be a BlockRoutingConfig or None, got dict"),
        (dict(capacity="linear"), "sampler.capacity must be a CapacityPolicy or None, got str"),
        (dict(eos_id=-1), "sampler.eos_id must be >= 0"),
        (dict(stop_at_eos="yes"), "sampler.stop_at_eos must be a bool"),
        (dict(suppress_tokens="eos"), "sampler.suppress_tokens must be a list of int token ids"),
        (dict(suppress_commit_tokens=[1.5]), r"sampler.suppress_commit_tokens\[0\] must be an int"),
        (dict(suppress_tokens=[2], suppress_commit_tokens=[2]), r"token ids \[2\] are in both"),
    ],
)
def test_bad_options_are_refused_at_construction(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**(GOOD | overrides))


def test_a_tensor_of_ids_becomes_a_list() -> None:
    assert SamplerConfig(**GOOD, suppress_tokens=torch.tensor([3, 1])).suppress_tokens == [3, 1]


def test_config_and_keywords_together_are_refused() -> None:
    sampler = SamplerConfig(**GOOD, mask_id=MASK)
    with pytest.raises(ValueError, match=r"not both \(got a sampler and \['steps'\]\)"):
        generate(TableModel(), _prompt(), sampler, steps=8)
    with pytest.raises(ValueError, match="generate needs a SamplerConfig"):
        generate(TableModel(), _prompt())
    with pytest.raises(ValueError, match="sampler must be a SamplerConfig, got dict"):
        generate(TableModel(), _prompt(), dict(GOOD))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['step'\]"):
        generate(TableModel(), _prompt(), gen_length=8, block_length=4, step=4)


def test_a_config_changed_after_construction_is_checked_again() -> None:
    sampler = SamplerConfig(**GOOD, mask_id=MASK)
    sampler.steps = 5
    with pytest.raises(ValueError, match="sampler.steps=5 must be a multiple of the number of blocks"):
        generate(TableModel(), _prompt(), sampler)
