"""Packed checkpoints: pack -> load round trip, checksums, corruption and wrong-model refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from profiles.codecs import compressed_nbytes
from profiles.errors import PolicyError
from profiles.models import load_model
from profiles.packed import (ALIGN, MANIFEST, PackedError, check_policy_matches, load_packed, pack,
                             read_packed)
from profiles.policy import Policy, StorageSpec, apply_policy
from profiles.runtime.store import ExpertStore
from tests.fixtures_models import save_tiny_model

SZP = Policy.uniform("szp", "meanabs", 0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe"))
    return load_model(str(path))


@pytest.fixture(scope="module")
def packed(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "ckpt"
    ckpt = pack(tiny, SZP, out)
    return ckpt


def test_manifest_records_fingerprint_policy_and_checksums(tiny, packed):
    doc = json.loads((packed.path / MANIFEST).read_text())
    assert doc["kind"] == "packed_checkpoint" and doc["schema_version"] == 1
    assert doc["fingerprint"] == tiny.fingerprint
    assert Policy.from_dict(doc["policy"]).default == SZP.default
    assert len(doc["experts"]) == len(tiny.expert_map.experts)
    for e in doc["experts"]:
        assert e["offset"] % ALIGN == 0
        for b in e["blobs"]:
            assert len(b["sha256"]) == 64 and len(b["crc32"]) == 8
            assert b["payload_offset"] % ALIGN == 0
    crcs = [b["crc32"] for e in doc["experts"] for b in e["blobs"]]
    assert len(set(crcs)) == len(crcs)          # each blob's own CRC32, not a constant residue
    assert set(doc["files"]) >= {"non_expert.safetensors", "config.json",
                                 "experts/layer_000.bin"}


def test_blob_sizes_are_the_codec_sizes(tiny, packed):
    """Each blob holds exactly what the codec layer says the tensor compresses to."""
    for entry in packed.experts[:6]:
        ref = tiny.expert_map.get(entry.layer, entry.expert)
        for b in entry.blobs:
            assert b.size == compressed_nbytes(ref.tensors[b.name], "szp", "meanabs", 0.5)
        assert entry.size - sum(b.size for b in entry.blobs) < ALIGN * len(entry.blobs)


def test_host_memory_is_the_sum_of_files(packed):
    files = [p for p in packed.path.rglob("*") if p.is_file()]
    assert packed.host_bytes == sum(p.stat().st_size for p in files)
    assert packed.stored_expert_bytes < packed.original_expert_bytes


def test_load_round_trip_equals_policy_applied_in_memory(tiny, packed):
    loaded = load_packed(packed.path)
    assert loaded.fingerprint == tiny.fingerprint
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with apply_policy(tiny, SZP):
        for ref in tiny.expert_map.experts:
            got = loaded.expert_map.get(ref.layer, ref.expert)
            for name, t in ref.tensors.items():
                assert torch.equal(got.tensors[name], t), (ref.layer, ref.expert, name)
        want = tiny.model(ids).logits
    assert torch.equal(loaded.model(ids).logits, want)


def test_corrupted_expert_file_is_refused(packed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(packed.path, bad)
    f = bad / "experts" / "layer_001.bin"
    entry = next(e for e in packed.experts if e.file == "experts/layer_001.bin")
    data = bytearray(f.read_bytes())
    data[entry.offset + entry.blobs[0].payload_offset + 3] ^= 0x40   # inside a payload
    f.write_bytes(bytes(data))
    with pytest.raises(PackedError, match="layer_001.bin: SHA-256 differs"):
        load_packed(bad)
    # without the manifest check, the blob's own CRC32 still catches it
    with pytest.raises(PackedError, match="CRC32 mismatch"):
        ExpertStore.from_packed(read_packed(bad, verify=False))


def test_truncated_and_missing_files_are_refused(packed, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(packed.path, bad)
    f = bad / "non_expert.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(PackedError, match="truncated or corrupt"):
        read_packed(bad)
    (bad / "config.json").unlink()
    with pytest.raises(PackedError, match="missing"):
        read_packed(bad)
    with pytest.raises(PackedError, match="not a packed checkpoint"):
        read_packed(tmp_path)


def test_plan_for_another_model_is_refused(tiny, tmp_path):
    other = Policy.uniform("szp", "meanabs", 0.5, fingerprint="fp2:0123456789abcdef")
    with pytest.raises(PolicyError, match="made for model fingerprint fp2:0123456789abcdef"):
        pack(tiny, other, tmp_path / "x")


def test_policy_must_match_the_packed_one(packed):
    check_policy_matches(packed, SZP)
    with pytest.raises(PolicyError, match="was packed with szp:meanabs:0.5"):
        check_policy_matches(packed, Policy(layers={1: StorageSpec("raw")}))
    with pytest.raises(PolicyError, match="fingerprint"):
        check_policy_matches(packed, SZP.with_fingerprint("fp2:0000000000000000"))


def test_non_empty_foreign_directory_is_refused(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PackedError, match="not empty"):
        pack(tiny, SZP, tmp_path)


def test_cpu_codec_pack_round_trip(tiny, tmp_path):
    pol = Policy(default=StorageSpec("raw"), layers={1: StorageSpec("sz3", "meanabs", 0.5)})
    ckpt = pack(tiny, pol, tmp_path / "mixed")
    loaded = load_packed(ckpt.path)
    with apply_policy(tiny, pol):
        ref = tiny.expert_map.get(1, 2)
        got = loaded.expert_map.get(1, 2)
        assert all(torch.equal(got.tensors[n], t) for n, t in ref.tensors.items())
    specs = {e.spec for e in ckpt.experts}
    assert specs == {"raw", "sz3:meanabs:0.5,predictor=nopred"}


def test_quantized_formats_pack_round_trip(tiny, tmp_path):
    # the formats users run, mixed per layer with an error-bounded codec, through pack and load
    pol = Policy(default=StorageSpec.parse("q4_k"),
                 layers={1: StorageSpec.parse("nf4,dq=false"), 2: StorageSpec("szp", "meanabs", 0.5)},
                 experts={(1, 2): StorageSpec.parse("gq,bits=3,group=128"),
                          (1, 3): StorageSpec.parse("mxfp4,scale=llamacpp")})
    ckpt = pack(tiny, pol, tmp_path / "formats")
    loaded = load_packed(ckpt.path)
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with apply_policy(tiny, pol):
        for ref in tiny.expert_map.experts:
            got = loaded.expert_map.get(ref.layer, ref.expert)
            assert all(torch.equal(got.tensors[n], t) for n, t in ref.tensors.items())
        want = tiny.model(ids).logits
    assert torch.equal(loaded.model(ids).logits, want)
    assert {e.spec for e in ckpt.experts} >= {"q4_k", "nf4,dq=False", "gq,bits=3,group=128",
                                              "mxfp4,scale=llamacpp"}
