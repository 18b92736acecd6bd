"""Expert offloading: bit-identical to the resident model, within its budget, and clear when it cannot be."""

import os

import pytest
import torch

from dlmoe.config import BlockRoutingConfig, ModelConfig, MoEConfig, RouterConfig
from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM
from dlmoe.offload import BudgetError, OffloadError, expert_store_of, load_offloaded, parse_size
from dlmoe.offload.files import read_header
from dlmoe.sampling import generate

MASK, EOS, E, D, F = 63, 62, 8, 32, 16
PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8]]
EXPERT_BYTES = (2 * F * D + D * F) * 4  # one fp32 expert: gate/up rows + down rows
ROUTERS = {
    "tc_dropless": {"kind": "token_choice"},
    "tc_capacity": {"kind": "token_choice", "capacity_factor": 1.0},
    "tc_sigmoid_bias": {"kind": "token_choice", "score": "sigmoid", "expert_bias": True},
    "ec": {"kind": "expert_choice"},
}


def save_model(folder, router: dict, *, shared: int = 1, seed: int = 0, backend: str = "auto"):
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=64, dim=D, num_layers=3, num_heads=4, max_seq_len=64, dense_hidden=48, first_k_dense=1,
        moe=MoEConfig(router=RouterConfig(num_experts=E, num_experts_per_tok=2, **router), expert_hidden=F,
                      num_shared_experts=shared, backend=backend),
        mask_id=MASK, eos_id=EOS, init_std=0.2,
    )  # fmt: skip
    model = DlmoeForDiffusionLM(DlmoeConfig.from_model_config(config)).eval()
    model.save_pretrained(folder)
    return model


def sample(model, **options):
    return generate(model, PROMPTS, **({"gen_length": 8, "block_length": 4, "steps": 8} | options))


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("backend", ["auto", "loop", "bmm"])
@pytest.mark.parametrize("chunk_experts", [None, 2])  # None: one call per layer; 2: experts two at a time
def test_logits_bit_identical_to_the_resident_model(tmp_path, monkeypatch, router, backend, chunk_experts):
    if chunk_experts:
        monkeypatch.setattr("dlmoe.offload.experts.CHUNK_BYTES", chunk_experts * EXPERT_BYTES)
    resident = save_model(tmp_path, ROUTERS[router], backend=backend)
    offloaded, store = load_offloaded(tmp_path, 10**8)
    ids, ratio = torch.randint(0, 62, (3, 20)), torch.tensor([0.2, 0.6, 1.0])
    with torch.no_grad(), store:
        assert torch.equal(offloaded(ids, mask_ratio=ratio).logits, resident(ids, mask_ratio=ratio).logits)
        assert not any(p.is_meta for p in offloaded.parameters())
        assert sum(p.numel() for p in offloaded.parameters()) < sum(p.numel() for p in resident.parameters())


@pytest.mark.parametrize("router", ["tc_dropless", "ec"])
@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("block", [None, BlockRoutingConfig(top_p=0.5, guard=3)])
def test_generation_bit_identical_with_a_tight_budget(tmp_path, router, cache, block):
    resident = save_model(tmp_path, ROUTERS[router])
    offloaded, store = load_offloaded(tmp_path, E * EXPERT_BYTES)  # half of the 2 layers' 16 experts
    with store:
        want, got = (
            sample(resident, cache=cache, block_routing=block),
            sample(offloaded, cache=cache, block_routing=block),
        )
        assert torch.equal(got.tokens, want.tokens)
        figures = store.figures()
        assert figures["peak_bytes"] <= store.cache.budget  # the budget is never exceeded
        assert figures["loads"] + figures["prefetched"] >= 1 and figures["bytes_read"] > 0
        assert figures["evictions"] > 0 or block is not None  # token routing cycles the cache
        stats = got.stats
        assert stats.expert_loads == figures["loads"] and stats.expert_bytes_read == figures["bytes_read"]
        assert stats.peak_expert_bytes == figures["peak_bytes"] and want.stats.expert_loads is None


def test_block_routing_reads_fewer_expert_bytes_than_token_routing(tmp_path):
    save_model(tmp_path, ROUTERS["tc_dropless"])
    reads = {}
    for name, block in (("token", None), ("block", BlockRoutingConfig(top_p=1e-6, guard=2))):
        model, store = load_offloaded(tmp_path, E * EXPERT_BYTES, prefetch=False)
        with store:
            reads[name] = sample(model, block_routing=block, cache="dual").stats.expert_bytes_read
    assert reads["block"] < reads["token"]


def test_budget_smaller_than_a_forward_is_refused_clearly(tmp_path):
    save_model(tmp_path, ROUTERS["tc_dropless"])
    with pytest.raises(ValueError, match="smaller than one expert"):
        load_offloaded(tmp_path, EXPERT_BYTES - 1)
    model, store = load_offloaded(tmp_path, 2 * EXPERT_BYTES)  # token routing needs more than 2 experts at once
    with store, pytest.raises(BudgetError, match="raise --expert-memory"):
        sample(model)


def test_missing_and_truncated_shards_are_reported_by_name(tmp_path):
    save_model(tmp_path, ROUTERS["ec"])
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OffloadError, match="truncated"):
        load_offloaded(tmp_path, 10**8)
    weights.unlink()
    with pytest.raises(OffloadError, match="neither model.safetensors"):
        load_offloaded(tmp_path, 10**8)


def test_an_interrupted_generation_leaves_nothing_behind(tmp_path):
    resident = save_model(tmp_path, ROUTERS["tc_dropless"])
    before = sorted(os.listdir(tmp_path))
    model, store = load_offloaded(tmp_path, E * EXPERT_BYTES)

    def stop(step):
        if step.step == 3:
            raise KeyboardInterrupt

    with store:
        with pytest.raises(KeyboardInterrupt):
            sample(model, callback=stop)
        assert store.cache.used <= store.cache.budget
        assert torch.equal(sample(model).tokens, sample(resident).tokens)  # the store is still consistent
    assert sorted(os.listdir(tmp_path)) == before  # nothing written beside the weights
    assert store._executor is None and store.cache.used == 0  # the reader thread stopped, memory released


def test_the_store_finds_the_experts_and_reads_only_them(tmp_path):
    save_model(tmp_path, ROUTERS["ec"])
    model, store = load_offloaded(tmp_path, 10**8)
    with store:
        assert expert_store_of(model) is store and store.layers == [1, 2]  # layer 0 is dense
        header = read_header(tmp_path / "model.safetensors")
        expert_bytes = sum(t.end - t.start for n, t in header.items() if ".ffn.experts." in n)
        dense_bytes = sum(t.end - t.start for t in store.dense_tensors().values())
        assert dense_bytes + expert_bytes == sum(t.end - t.start for t in header.values())


@pytest.mark.parametrize(
    "text,size", [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("800M", 800_000_000),
                  ("4096", 4096), (123, 123), (" 1 KiB ", 1024)],
)  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-5MiB", "0", "1.5XB", True])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="expert memory"):
        parse_size(text)
