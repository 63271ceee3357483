"""Packed checkpoints: a model's routed experts stored compressed as a `Policy` says, to serve.

A packed checkpoint is a directory:

    manifest.json              kind "packed_checkpoint", schema_version 1 (see below)
    config.json                the transformers config
    tokenizer.json | ...       the tokenizer, when the model has one
    non_expert.safetensors     every weight that is not a routed expert (attention, norms,
                               embeddings, routers, shared experts, dense MLPs)
    experts/layer_NNN.bin      the routed experts of MoE layer NNN, expert after expert

Each routed-expert tensor is one blob in the codec layer's own format (`Blob.to_bytes()`: header,
payload, CRC32). The blobs of one expert follow each other in its layer file; each blob is placed
so that its payload starts on a 16-byte boundary (padding bytes in between are zero), so a device
decoder can read a payload in place once the expert's bytes have been copied over. One expert's
bytes (`offset`, `size` in the manifest) are what the runtime keeps in host memory and copies to
the GPU on a miss.

The manifest records the model fingerprint, the policy, the geometry, and for every expert and
every blob its file, offset, size, CRC32 and SHA-256, and for every other file its size and
SHA-256. `load_packed` verifies all of them before it trusts a byte; a corrupt or truncated file is
refused with a one-line error naming it. The host memory a packed model occupies is the sum of its
files (`PackedCheckpoint.host_bytes`), and that is what is reported.
"""

from profiles.packed.read import (
                                  build_model,
                                  check_policy_matches,
                                  load_packed,
                                  load_tokenizer,
                                  parse_blob,
                                  read_expert_files,
                                  read_packed,
)
from profiles.packed.records import (
                                  ALIGN,
                                  KIND,
                                  MANIFEST,
                                  NON_EXPERT,
                                  SCHEMA_VERSION,
                                  BlobEntry,
                                  EncodedExpert,
                                  ExpertEntry,
                                  PackedCheckpoint,
                                  PackedError,
                                  encode_expert,
                                  is_packed,
                                  routed_parameter_names,
)
from profiles.packed.write import pack

__all__ = ["KIND", "SCHEMA_VERSION", "ALIGN", "MANIFEST", "NON_EXPERT", "BlobEntry",
           "EncodedExpert", "ExpertEntry", "PackedCheckpoint", "PackedError", "build_model",
           "check_policy_matches", "encode_expert", "is_packed", "load_packed", "load_tokenizer",
           "pack", "parse_blob", "read_expert_files", "read_packed", "routed_parameter_names"]
