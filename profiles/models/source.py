"""Where a model's routed experts are read from: its checkpoint files, one expert at a time, or a
model already in memory. Packing and ratio measurement take either, so a checkpoint of any size is
streamed (each expert read, encoded and dropped) while tests and random models use memory.

Both give an expert's tensors by moesz's names (`gate_up_proj`, `down_proj`, …) in the dtype the
model is evaluated in: the stored dtype, except FP8 (e4m3) experts, dequantized exactly into fp32
as `load_model` does.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from profiles.models.geometry import ModelGeometry

# files of a checkpoint directory that a packed copy takes along unchanged
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                   "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclass
class FileExperts:
    """A checkpoint directory read expert by expert from its safetensors files.

    Attributes:
        spec: how the user named the model (`builtin` or the directory).
        path: the checkpoint directory.
        config: its transformers config (quantization removed for FP8: moesz dequantizes).
        geometry, fingerprint: as `checkpoint_info` gives them.
        files, layout: the opened files and the experts' places in them.
    """

    spec: str
    path: Path
    config: Any
    geometry: ModelGeometry
    fingerprint: str
    files: Any
    layout: Any

    @classmethod
    def open(cls, spec: str, trust_remote_code: bool = False) -> "FileExperts":
        """Open `builtin` or a checkpoint directory (headers read and checked, nothing loaded).

        Raises:
            ModelError: as `profiles.models.checkpoint_info`.
        """
        from profiles.models.loading import (
            _checkpoint_dir,
            _parse_spec,
            _read_config,
            _without_quantization,
            checkpoint_info,
        )

        info = checkpoint_info(spec, trust_remote_code)
        kind, arg, _ = _parse_spec(spec)
        path = _checkpoint_dir(kind, arg)
        config = _without_quantization(_read_config(path, trust_remote_code))
        return cls(spec, path, config, info.geometry, info.fingerprint, info.files, info.layout)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.geometry.moe_layers

    @property
    def experts_per_layer(self) -> int:
        return self.geometry.experts_per_layer

    @property
    def dtype(self) -> torch.dtype:
        """The dtype expert tensors come in (fp32 for FP8 checkpoints, bf16 for MXFP4)."""
        from profiles.models.files import ST_DTYPES

        st = self.layout.experts[(self.moe_layers[0], 0)][0].dtype
        if st == "MXFP4":
            return torch.bfloat16  # decoded exactly into bf16, as transformers does
        return torch.float32 if st == "F8_E4M3" else ST_DTYPES[st][2]

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Expert `expert` of layer `layer` read from the files (a fresh copy, yours to drop)."""
        from profiles.models.layout import read_expert_tensor

        return {t.name: read_expert_tensor(self.files, t)
                for t in self.layout.experts[(layer, expert)]}

    def non_expert_tensors(self) -> Iterator[tuple[str, Any]]:
        """(in-memory name, `TensorOut`) of every tensor that is not a routed expert, streamed
        from the files (FP8 weights dequantized into fp32 with their scales, one at a time)."""
        from profiles.models.files import TensorOut, copy_chunks
        from profiles.models.layout import non_expert_name

        arch = self.geometry.architecture
        for name, info in self.files.tensors.items():
            if name in self.layout.routed or name in self.layout.beyond \
                    or name.endswith("_scale_inv"):
                continue
            out_name = non_expert_name(name, arch)
            if info.dtype == "F8_E4M3":
                yield out_name, TensorOut(out_name, "F32", info.shape,
                                          lambda n=name: [self._fp8_as_fp32(n)])
            else:
                yield out_name, TensorOut(out_name, info.dtype, info.shape,
                                          lambda n=name: copy_chunks(self.files, n))

    def _fp8_as_fp32(self, name: str):
        from profiles.models.checkpoint import _dequant_blocks

        q = self.files.tensor(name)
        scale = name + "_scale_inv"
        t = (_dequant_blocks(q, self.files.tensor(scale)) if scale in self.files.tensors
             else q.to(torch.float32))
        return t.contiguous().numpy()

    def config_json(self) -> str:
        return self.config.to_json_string()

    def copy_tokenizer(self, out: Path, copy: Callable[[Path, Path], None] | None = None) -> None:
        """Copy the tokenizer (and generation) files beside the weights into `out`."""
        for name in TOKENIZER_FILES:
            src = self.path / name
            if src.is_file():
                (copy or _copy)(src, out / name)


def _copy(src: Path, dst: Path) -> None:
    from profiles.fileio import atomic_write_with

    atomic_write_with(dst, lambda p: shutil.copyfile(src, p))


@dataclass
class PackedSource:
    """A packed checkpoint's config and non-expert weights, for a model served from its files."""

    spec: str
    path: Path
    ckpt: Any          # profiles.packed.PackedCheckpoint (verified)
    config: Any
    files: Any         # CheckpointFiles of non_expert.safetensors

    @classmethod
    def open(cls, spec: str, trust_remote_code: bool = False) -> "PackedSource":
        """Open and verify (every file's SHA-256) a packed checkpoint directory.

        Raises:
            PackedError: a missing, corrupt or incomplete packed checkpoint.
        """
        from transformers import AutoConfig

        from profiles.models.files import CheckpointFiles
        from profiles.packed import read_packed
        from profiles.packed.records import NON_EXPERT, PackedError

        ckpt = read_packed(Path(spec).expanduser(), verify=True)
        try:
            config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise PackedError(f"{ckpt.path}/config.json: cannot be read "
                              f"({str(exc).splitlines()[0]})") from None
        files = CheckpointFiles.open_files(ckpt.path, (ckpt.path / NON_EXPERT,))
        return cls(spec, ckpt.path, ckpt, config, files)

    @property
    def geometry(self) -> ModelGeometry:
        return self.ckpt.geometry

    @property
    def fingerprint(self) -> str:
        return self.ckpt.fingerprint

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.ckpt.manifest["model"].get("dtype", "bfloat16"))

    def non_expert_tensors(self) -> Iterator[tuple[str, Any]]:
        from profiles.models.files import TensorOut, copy_chunks

        for name, info in self.files.tensors.items():
            yield name, TensorOut(name, info.dtype, info.shape,
                                  lambda n=name: copy_chunks(self.files, n))


@dataclass
class LoadedExperts:
    """A model in memory (`profiles.models.LoadedModel`) seen as an expert source."""

    loaded: Any

    @property
    def spec(self) -> str:
        return self.loaded.spec

    @property
    def geometry(self) -> ModelGeometry:
        return self.loaded.geometry

    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.loaded.expert_map.moe_layers

    @property
    def experts_per_layer(self) -> int:
        return self.loaded.expert_map.experts_per_layer

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.model.dtype

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return dict(self.loaded.expert_map.get(layer, expert).tensors)

    def non_expert_tensors(self) -> Iterator[tuple[str, Any]]:
        import numpy as np

        from profiles.models.files import TensorOut
        from profiles.packed.records import routed_parameter_names

        skip = routed_parameter_names(self.loaded.model, self.loaded.expert_map)
        seen = set()
        for name, t in self.loaded.model.state_dict().items():
            if name in skip:
                continue
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if ptr in seen:  # a tied weight (lm_head = embed_tokens): the config re-ties it on load
                continue
            seen.add(ptr)
            st = _ST_NAMES[t.dtype]
            yield name, TensorOut(name, st, tuple(t.shape), lambda t=t: [
                t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                .view(np.uint8)])

    def config_json(self) -> str:
        return self.loaded.model.config.to_json_string()

    def copy_tokenizer(self, out: Path, copy=None) -> None:
        tokenizer = self.loaded.tokenizer
        if tokenizer is None:
            return
        from profiles.tasks import CharTokenizer

        if isinstance(tokenizer, CharTokenizer):
            tokenizer.save(out / "tokenizer.json")
        elif hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out))


_ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}


def expert_source(model) -> "FileExperts | LoadedExperts":
    """The expert source of a LoadedModel, an expert source, or a spec (files are opened)."""
    if isinstance(model, (FileExperts, LoadedExperts)):
        return model
    if isinstance(model, str):
        return FileExperts.open(model)
    offload = getattr(model, "offload", None)
    if offload is not None:  # its expert tensors are shared buffers: read the files instead
        source = getattr(offload.reader, "source", None)
        if source is None:
            from profiles.errors import ModelError

            raise ModelError(f"{model.spec}: a packed checkpoint's experts are stored under its "
                             f"policy; read the original checkpoint instead")
        return source
    return LoadedExperts(model)
