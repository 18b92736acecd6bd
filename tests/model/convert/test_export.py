"""Export → the original files bit for bit; export → re-import → the same model.

Checkpoints are tiny random ones in the exact layouts (tiny_checkpoints.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlmoe.model.convert import detect_format, export_checkpoint, import_checkpoint
from tests.model.convert import reference as ref
from tests.model.convert import tiny_checkpoints as tiny
from tests.model.convert.helpers import LLADAMOE_VARIANTS, token_ids, write

# --------------------------------------------------------------------------- export round trip

ROUND_TRIPS = {
    "lladamoe": ("lladamoe", LLADAMOE_VARIANTS["all_options"]),
    "lladamoe_plain": ("lladamoe", {}),
    "llada2_moe": ("llada2_moe", {}),
    "llada2_moe_two_shared": ("llada2_moe", {"num_shared_experts": 2, "top_k": 1}),
}


def check_layout_equal(exported: Path, original: Path) -> None:
    """Same config.json, same tensor names, shapes, dtypes and bits; a consistent index."""
    assert json.loads((exported / "config.json").read_text()) == json.loads((original / "config.json").read_text())
    _, want = ref.load_checkpoint(original)
    _, got = ref.load_checkpoint(exported)
    assert sorted(got) == sorted(want), (
        f"missing {sorted(want.keys() - got.keys())}, extra {sorted(got.keys() - want.keys())}"
    )
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name
    shards = sorted(p.name for p in exported.glob("*.safetensors"))
    pattern = re.compile(rf"model-(\d{{5}})-of-{len(shards):05d}\.safetensors")
    assert [int(pattern.fullmatch(s).group(1)) for s in shards] == list(range(1, len(shards) + 1)), shards
    index = json.loads((exported / tiny.INDEX_NAME).read_text())
    assert sorted(index["weight_map"]) == sorted(want)
    for shard in shards:
        assert set(load_file(exported / shard)) == {n for n, f in index["weight_map"].items() if f == shard}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_export_restores_the_original_files_bit_exactly(tmp_path: Path, case: str, dtype: torch.dtype) -> None:
    kind, options = ROUND_TRIPS[case]
    original = write(kind, tmp_path / "original", dtype=dtype, **options)
    imported = import_checkpoint(original)
    assert {p.dtype for p in imported.model.parameters()} == {dtype}
    out = export_checkpoint(
        imported.model, tmp_path / "export", format=kind, source_config=imported.source_config, max_shard_bytes=4096
    )
    assert Path(out) == tmp_path / "export"
    assert len(list(out.glob("*.safetensors"))) > 2  # several shards under the size limit
    check_layout_equal(out, original)
    # config.json is the original's, which names no mask id: the mask is the tokenizer's, and a
    # checkpoint travels with its tokenizer files (export writes weights and config only)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(original / name, out / name)
    reimported = import_checkpoint(out)
    assert reimported.format == kind
    ids = token_ids(length=40)
    with torch.no_grad():
        assert torch.equal(reimported.model(ids).logits, imported.model(ids).logits)


@pytest.mark.parametrize("kind", ["lladamoe", "llada2_moe"])
def test_export_without_source_config_reimports_to_the_same_model(tmp_path: Path, kind: str) -> None:
    options = LLADAMOE_VARIANTS["all_options"] if kind == "lladamoe" else {}
    original = write(kind, tmp_path / "original", **options)
    imported = import_checkpoint(original, block_size=4)
    out = export_checkpoint(imported.model, tmp_path / "export", format=kind)
    _, want = ref.load_checkpoint(original)
    _, got = ref.load_checkpoint(out)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], t) for n, t in want.items())
    assert detect_format(out) == kind
    reimported = import_checkpoint(out, block_size=4)
    assert reimported.model.model.config == imported.model.model.config
    ids = token_ids(length=20)
    with torch.no_grad():
        assert torch.equal(reimported.model(ids).logits, imported.model(ids).logits)


def test_export_of_a_converted_import_states_the_new_dtype(tmp_path: Path) -> None:
    """fp32 checkpoint imported as bf16: the exported config.json says bfloat16, everything else as it was."""
    original = write("llada2_moe", tmp_path / "src")
    imported = import_checkpoint(original, dtype=torch.bfloat16)
    out = export_checkpoint(imported.model, tmp_path / "out", format="llada2_moe", source_config=imported.source_config)
    config = json.loads((out / "config.json").read_text())
    assert config.pop("torch_dtype") == "bfloat16"
    source = json.loads((original / "config.json").read_text())
    assert source.pop("torch_dtype") == "float32" and config == source
    assert all(t.dtype == torch.bfloat16 for t in ref.load_checkpoint(out)[1].values())


def test_an_interrupted_export_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dlmoe.model.convert as convert

    imported = import_checkpoint(write("lladamoe", tmp_path / "src"))
    real_write = convert.write_shards

    def write_then_fail(folder, tensors, max_shard_bytes):
        real_write(folder, tensors, max_shard_bytes)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "write_shards", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(imported.model, tmp_path / "out", format="lladamoe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no "out", no scratch folder
