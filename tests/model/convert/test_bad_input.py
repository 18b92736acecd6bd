"""Bad checkpoint folders: a `CheckpointError` that says what is wrong, nothing loaded or changed.

Checkpoints are tiny random ones in the exact layouts (tiny_checkpoints.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmoe.model.convert import CheckpointError, detect_format, import_checkpoint
from tests.model.convert import reference as ref
from tests.model.convert import tiny_checkpoints as tiny
from tests.model.convert.helpers import H, snapshot, write

# --------------------------------------------------------------------------- bad input


def rewrite_shard(folder: Path, shard: str, edit) -> None:
    """Load one shard, apply `edit(dict)` in place, write it back and update the index."""
    tensors = load_file(folder / shard)
    edit(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index_path = folder / tiny.INDEX_NAME
    index = json.loads(index_path.read_text())
    weight_map = {n: f for n, f in index["weight_map"].items() if f != shard} | dict.fromkeys(tensors, shard)
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


def shard_of(folder: Path, name: str) -> str:
    return json.loads((folder / tiny.INDEX_NAME).read_text())["weight_map"][name]


def expect_error(folder: Path, *fragments: str) -> str:
    """import raises CheckpointError (a ValueError) naming every fragment and leaves the folder as it was."""
    before = snapshot(folder) if folder.is_dir() else None
    with pytest.raises(CheckpointError) as error:
        import_checkpoint(folder)
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if before is not None:
        assert snapshot(folder) == before
    return message


def test_folder_without_config_json_is_rejected(tmp_path: Path) -> None:
    expect_error(tmp_path / "does-not-exist")
    tmp_path.joinpath("empty").mkdir()
    expect_error(tmp_path / "empty", "config.json")
    folder = write("lladamoe", tmp_path / "no-config")
    (folder / "config.json").unlink()
    expect_error(folder, "config.json")


def test_config_without_weights_is_rejected(tmp_path: Path) -> None:
    folder = write("llada2_moe", tmp_path)
    for path in [*folder.glob("*.safetensors"), folder / tiny.INDEX_NAME]:
        path.unlink()
    expect_error(folder, "safetensors")


def test_unknown_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    folder = write("lladamoe", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "mixtral"}))
    expect_error(folder, "mixtral", "lladamoe", "llada2_moe")
    with pytest.raises(CheckpointError, match="llada2_moe"):
        detect_format(folder)


@pytest.mark.parametrize(
    ("kind", "options", "name"),
    [
        ("lladamoe", {}, "model.layers.1.mlp.experts.3.up_proj.weight"),
        ("lladamoe", {"expert_bias": True}, "model.layers.0.mlp.expert_bias"),
        ("lladamoe", {"shared_width": 12}, "model.layers.1.shared_expert.down_proj.weight"),
        ("llada2_moe", {}, "model.layers.2.mlp.gate.expert_bias"),
        ("llada2_moe", {}, "model.layers.0.attention.query_key_value.weight"),
    ],
)
def test_missing_tensor_is_named(tmp_path: Path, kind: str, options: dict, name: str) -> None:
    folder = write(kind, tmp_path, **options)
    rewrite_shard(folder, shard_of(folder, name), lambda tensors: tensors.pop(name))
    expect_error(folder, name)


@pytest.mark.parametrize("kind", ["lladamoe", "llada2_moe"])
def test_extra_tensor_is_named(tmp_path: Path, kind: str) -> None:
    folder = write(kind, tmp_path)
    extra = "model.layers.1.mlp.experts.8.up_proj.weight"  # one expert more than num_experts
    shard = shard_of(folder, "lm_head.weight")
    rewrite_shard(folder, shard, lambda tensors: tensors.update({extra: torch.zeros(16, H)}))
    expect_error(folder, extra)


def test_renamed_tensor_is_named_as_missing_and_extra(tmp_path: Path) -> None:
    folder = write("lladamoe", tmp_path)
    old, new = "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.query_norm.weight"
    rewrite_shard(folder, shard_of(folder, old), lambda tensors: tensors.update({new: tensors.pop(old)}))
    expect_error(folder, old, new)


def shape_strings(shape: tuple[int, ...]) -> tuple[str, ...]:
    return (str(tuple(shape)), str(list(shape)), "x".join(map(str, shape)), "×".join(map(str, shape)))


@pytest.mark.parametrize(
    ("kind", "name", "wrong"),
    [
        ("lladamoe", "model.layers.1.mlp.experts.0.down_proj.weight", (H, 12)),
        ("lladamoe", "model.layers.0.self_attn.k_norm.weight", (4,)),
        ("llada2_moe", "model.layers.1.attention.query_key_value.weight", (48, H)),  # kv heads 1, not 2
        ("llada2_moe", "model.word_embeddings.weight", (63, H)),
    ],
)
def test_shape_mismatch_names_the_tensor_and_both_shapes(
    tmp_path: Path, kind: str, name: str, wrong: tuple[int, ...]
) -> None:
    folder = write(kind, tmp_path)
    _, tensors = ref.load_checkpoint(folder)
    right = tuple(tensors[name].shape)
    rewrite_shard(folder, shard_of(folder, name), lambda t: t.update({name: torch.zeros(wrong)}))
    message = expect_error(folder, name)
    for shape in (right, wrong):
        assert any(s in message for s in shape_strings(shape)), f"shape {shape} not in {message!r}"


@pytest.mark.parametrize("keep", [0.5, 8 / 10_000])
def test_truncated_shard_is_rejected(tmp_path: Path, keep: float) -> None:
    """A shard cut short (a half-finished download), in its data or in its header."""
    folder = write("lladamoe", tmp_path)
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: max(4, int(len(data) * keep))])
    expect_error(folder, shard.name)


def test_index_naming_a_missing_shard_is_rejected(tmp_path: Path) -> None:
    folder = write("llada2_moe", tmp_path)
    index = json.loads((folder / tiny.INDEX_NAME).read_text())
    index["weight_map"]["lm_head.weight"] = "model-00003-of-00003.safetensors"
    (folder / tiny.INDEX_NAME).write_text(json.dumps(index))
    expect_error(folder, "model-00003-of-00003.safetensors")


def test_dense_layer_after_an_moe_layer_is_rejected(tmp_path: Path) -> None:
    """dlmoe has dense layers only before the first MoE layer; another moe_layer_freq must not import silently."""
    folder = write("lladamoe", tmp_path, num_layers=3, moe_layer_freq=[1, 0, 1])
    expect_error(folder, "moe_layer_freq")
