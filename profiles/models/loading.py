"""Resolve a model spec to its geometry, and load real checkpoints from local safetensors.

A spec is one of:

- `builtin`: the model shipped in `profiles/builtin/`;
- a local directory with `config.json` (and, to load weights, `*.safetensors`);
- `preset:NAME[,key=value…]`: a real model's published geometry (`profiles.models.presets`);
- `arch:NAME[,key=value…]`: transformers' default config of architecture NAME with overrides.

Geometries are computed from a model built on the `meta` device (no memory, no weights). Weightless
geometries are bf16 unless `dtype=` says otherwise. Checkpoints load from safetensors only (pickle
files are refused), with `trust_remote_code` off unless asked. FP8 (e4m3) checkpoints are
dequantized here, not by transformers: each e4m3 value is exactly representable in fp32, and a
block-scaled weight becomes value x scale computed in fp32 (DeepSeek's reference `weight_dequant`
arithmetic), loaded in float32 by default so nothing is rounded a second time; the geometry keeps
`fp8_e4m3`, so compression ratios are counted against the FP8 bytes. MXFP4 checkpoints (gpt-oss)
have a geometry but are refused for loading: no moesz codec represents MXFP4 values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from profiles.errors import ModelError
from profiles.models.checkpoint import (
    checkpoint_format,
    dequantized_fp8_state_dict,
    dequantized_mxfp4_state_dict,
    require_safetensors,
    safetensors_total_bytes,
)
from profiles.models.expert_map import ExpertMap, build_expert_map
from profiles.models.geometry import (
    ModelGeometry,
    check_dtype,
    geometry_from_files,
    geometry_from_model,
)
from profiles.models.presets import get_preset

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SPEC_HELP = ("expected builtin, a local directory with config.json, preset:NAME or "
              "arch:NAME[,key=value…]")


@dataclass(frozen=True)
class LoadedModel:
    """A weighted model ready to evaluate: the transformers model (eval mode) and what moesz knows
    about it. `tokenizer` is None when the checkpoint directory has no tokenizer files."""

    model: Any
    tokenizer: Any
    geometry: ModelGeometry
    expert_map: ExpertMap
    fingerprint: str
    spec: str
    offload: Any = None   # profiles.models.offload.OffloadedExperts when experts stay on disk


def resolve_geometry(spec: str, trust_remote_code: bool = False) -> ModelGeometry:
    """The geometry of a model spec, without loading weights.

    Raises:
        ModelError: unknown spec, missing directory, unknown preset/architecture/config key, or a
            model without routed experts.
    """
    kind, arg, overrides = _parse_spec(spec)
    if kind in ("preset", "arch"):
        dtype = check_dtype(str(overrides.pop("dtype", "bf16")), f"{spec}: dtype")
        if kind == "preset":
            preset = get_preset(arg)
            config = _config_for(arg, preset.architecture, {**preset.config, **overrides})
        else:
            config = _config_for(spec, arg, overrides)
        block = (128, 128) if dtype == "fp8_e4m3" else None
        model = _meta_model(config, dtype, trust_remote_code, spec)
        return geometry_from_model(model, spec, dtype, block)
    path = _checkpoint_dir(kind, arg)
    config = _read_config(path, trust_remote_code)
    dtype, block = checkpoint_format(config, path)
    if _has_safetensors(path):
        files, layout = open_checkpoint(path, config)
        return geometry_from_files(files, layout, config, spec, dtype, block)
    model = _meta_model(config, dtype, trust_remote_code, spec)
    return geometry_from_model(model, spec, dtype, block, safetensors_total_bytes(path))


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint directory read from its files alone: what `moesz model info` reports."""

    geometry: ModelGeometry
    fingerprint: str
    layout: Any        # profiles.models.layout.ExpertLayout
    files: Any         # profiles.models.files.CheckpointFiles


def checkpoint_info(spec: str, trust_remote_code: bool = False) -> CheckpointInfo:
    """Geometry and fingerprint of `builtin` or a checkpoint directory from config.json and the
    safetensors files (headers, and the fingerprint's sampled elements memory-mapped); no model is
    built and no weight is loaded, so time and memory do not grow with the checkpoint.

    Raises:
        ModelError: a weightless spec, a directory without safetensors, corrupt or inconsistent
            files, a dense model.
    """
    from profiles.models.fingerprint import files_fingerprint

    kind, arg, _ = _parse_spec(spec)
    if kind in ("preset", "arch"):
        raise ModelError(f"{spec} is a geometry without weights (no fingerprint, no experts to "
                         f"read); this needs builtin or a local checkpoint directory")
    path = _checkpoint_dir(kind, arg)
    config = _read_config(path, trust_remote_code)
    dtype, block = checkpoint_format(config, path)
    files, layout = open_checkpoint(path, config)
    return CheckpointInfo(geometry_from_files(files, layout, config, spec, dtype, block),
                          files_fingerprint(files, layout), layout, files)


def open_checkpoint(path: Path, config=None):
    """(`CheckpointFiles`, `ExpertLayout`) of a checkpoint directory, headers checked."""
    from profiles.models.files import CheckpointFiles
    from profiles.models.layout import expert_layout

    files = CheckpointFiles.open(path)
    return files, expert_layout(files, config)


def _has_safetensors(path: Path) -> bool:
    from profiles.models.files import INDEX

    return (path / INDEX).is_file() or any(path.glob("*.safetensors"))


def load_model(spec: str, trust_remote_code: bool = False, dtype: str | None = None,
               device: str | torch.device | None = None, host_mem: int | None = None,
               offload: bool = False) -> LoadedModel:
    """Load a weighted MoE model for evaluation and perturbation.

    Args:
        spec: `builtin` or a local checkpoint directory (safetensors).
        trust_remote_code: allow the checkpoint's own Python code (off by default).
        dtype: `bf16`, `fp16` or `fp32` to load in; default: the checkpoint's dtype, and fp32 for
            FP8 checkpoints (exact dequantization).
        device: where to put the model (default CPU).
        host_mem: with `offload`, bytes of expert records kept in host memory (None: all).
        offload: leave the routed experts on disk and read each layer's routed experts when it
            runs (`profiles.models.offload`): for models larger than host memory. A packed
            checkpoint directory is always served this way.

    Raises:
        ModelError: a weightless spec, a missing directory, pickle-only checkpoints, or a
            model without routed experts.
    """
    kind, arg, _ = _parse_spec(spec)
    if kind in ("preset", "arch"):
        raise ModelError(f"{spec} is a geometry without weights; load_model needs builtin or a "
                         f"local checkpoint directory (moesz model info works on {spec})")
    from profiles.packed.records import is_packed

    if kind == "dir" and is_packed(Path(arg).expanduser()):
        return _load_offloaded(spec, trust_remote_code, host_mem, packed=True)
    if offload or host_mem is not None:
        if dtype is not None or device not in (None, "cpu"):
            raise ModelError("--host-mem serves experts from disk in the checkpoint's dtype on "
                             "the CPU; drop --dtype/--device or --host-mem")
        return _load_offloaded(spec, trust_remote_code, host_mem, packed=False)
    if kind == "builtin":
        model, tokenizer = _load_builtin(_load_dtype(dtype) if dtype else None)
        path = builtin_dir()
        ckpt_dtype, block = checkpoint_format(model.config, path)
        info = checkpoint_info(spec)
    else:
        path = _checkpoint_dir(kind, arg)
        config = _read_config(path, trust_remote_code)
        ckpt_dtype, block = checkpoint_format(config, path)
        _meta_model(config, ckpt_dtype, trust_remote_code, spec)  # fail fast on non-MoE models
        require_safetensors(path)
        info = checkpoint_info(spec, trust_remote_code)  # headers checked before any load
        load_dtype = _load_dtype(dtype or {"fp8_e4m3": "fp32", "mxfp4": "bf16"}.get(ckpt_dtype,
                                                                                  ckpt_dtype))
        model = _from_pretrained(path, config, ckpt_dtype, load_dtype, trust_remote_code)
        tokenizer = _tokenizer(path, trust_remote_code)
    if device is not None:
        model = model.to(device)
    model.eval()
    emap = build_expert_map(model, spec)
    geometry = geometry_from_model(model, spec, ckpt_dtype, block, safetensors_total_bytes(path),
                                   emap)
    # the checkpoint's fingerprint, from its files: the same whatever dtype it was loaded in
    return LoadedModel(model=model, tokenizer=tokenizer, geometry=geometry, expert_map=emap,
                       fingerprint=info.fingerprint,
                       spec=spec)


def _load_offloaded(spec: str, trust_remote_code: bool, host_mem: int | None,
                    packed: bool) -> LoadedModel:
    """A LoadedModel whose routed experts stay on disk (`profiles.models.offload`)."""
    from profiles.models.offload import FileReader, PackedReader, build_offloaded
    from profiles.models.source import FileExperts, PackedSource

    if host_mem is not None and host_mem < 0:
        raise ModelError(f"--host-mem {host_mem} must be a byte count >= 0")
    if packed:
        source = PackedSource.open(spec)
        reader = PackedReader(source.ckpt)
        tokenizer_dir = source.path
    else:
        source = FileExperts.open(spec, trust_remote_code)
        reader = FileReader(source)
        tokenizer_dir = source.path
    model, emap, offload = build_offloaded(source, reader, host_mem, trust_remote_code)
    from profiles.packed import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, geometry=source.geometry,
                       expert_map=emap, fingerprint=source.fingerprint, spec=spec,
                       offload=offload)


# --- specs and configs -------------------------------------------------------------------------

def _parse_spec(spec: str) -> tuple[str, str, dict]:
    spec = str(spec).strip()
    if spec == "builtin":
        return "builtin", "", {}
    for kind in ("preset", "arch"):
        if spec.startswith(kind + ":"):
            name, *pairs = spec[len(kind) + 1:].split(",")
            if not name:
                raise ModelError(f"model {spec!r}: missing name after '{kind}:'; {_SPEC_HELP}")
            overrides = {}
            for pair in pairs:
                key, sep, value = pair.partition("=")
                if not sep or not key.strip():
                    raise ModelError(f"model {spec!r}: {pair!r} is not key=value; {_SPEC_HELP}")
                overrides[key.strip()] = _parse_value(value.strip())
            return kind, name.strip(), overrides
    return "dir", spec, {}


def _parse_value(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _config_for(what: str, arch: str, overrides: dict):
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(arch)
    except (ValueError, KeyError):
        raise ModelError(f"{what}: transformers has no architecture {arch!r}; MoE architectures "
                         f"include mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, "
                         f"gpt_oss, phimoe") from None
    unknown = [k for k in overrides if not hasattr(default, k) and not _read_by_model(arch, k)]
    if unknown:
        hints = sorted(k for k in default.to_dict() if any(
            w in k for w in ("expert", "_layers", "hidden_size", "intermediate", "dense", "heads")))
        raise ModelError(f"{what}: {arch} config has no key {unknown[0]!r}; keys that shape the "
                         f"experts include {', '.join(hints)}")
    for key, value in overrides.items():
        if value is None and key in _DERIVED:
            continue  # None: derived by the config from other keys
        if key in _COUNTS and not (isinstance(value, int) and value >= 1):
            raise ModelError(f"{what}: override {key}={value!r} must be an integer >= 1")
    try:
        return AutoConfig.for_model(arch, **overrides)
    except Exception as exc:  # ValueError, TypeError, huggingface_hub's validation errors
        first = (str(exc).strip().splitlines()[-1].strip() if str(exc).strip()
                 else type(exc).__name__)
        raise ModelError(f"{what}: invalid config override ({first})") from None


_DERIVED = frozenset({"head_dim", "num_key_value_heads"})  # None means "derive it"
# config keys that count something a model needs at least one of
_COUNTS = frozenset({
    "num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "num_experts",
    "num_local_experts", "n_routed_experts", "num_experts_per_tok"})


def _read_by_model(arch: str, key: str) -> bool:
    """Whether the architecture's modeling code reads `key` even though its config class does not
    declare it (qwen3_moe reads `head_dim` with getattr); catches typos in overrides."""
    import importlib
    import inspect

    try:
        module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        source = inspect.getsource(module)
    except (ImportError, OSError, TypeError):
        return False
    return re.search(rf"config\.{re.escape(key)}\b|[\"']{re.escape(key)}[\"']", source) is not None


def _checkpoint_dir(kind: str, arg: str) -> Path:
    if kind == "builtin":
        path = builtin_dir()
        if not (path / "config.json").exists():
            raise ModelError("built-in model weights are not built yet; train them with "
                             "`python -m profiles.builtin.train` or pass a local checkpoint "
                             "directory")
        return path
    path = Path(arg).expanduser()
    if not path.is_dir():
        raise ModelError(f"model {arg!r}: no such directory; {_SPEC_HELP}")
    _refuse_packed(path)
    if not (path / "config.json").exists():
        raise ModelError(f"{path}: no config.json; expected a transformers checkpoint directory")
    return path


def _refuse_packed(path: Path) -> None:
    """A packed checkpoint (or an interrupted pack) is not a checkpoint of weights: say so rather
    than that its non-expert file holds no experts."""
    from profiles.packed.records import MANIFEST

    if (path / MANIFEST).is_file():
        raise ModelError(f"{path} is a packed checkpoint (its experts are stored compressed); "
                         f"this command reads the original checkpoint — give that directory, "
                         f"or serve this one with `moesz run` or `moesz model eval`")
    if (path / ".pack-state").is_dir():
        raise ModelError(f"{path}: an incomplete packed checkpoint (the pack was interrupted or "
                         f"failed; no {MANIFEST}); rerun the same `moesz pack` command to "
                         f"resume it")


def _read_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "trust_remote_code" in str(exc):
            msg = "this model needs its own code; pass --trust-remote-code if you trust it"
        raise ModelError(f"{path}/config.json: {msg}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}/config.json: cannot be read ({_first_line(exc)})") from None


def _meta_model(config, dtype: str, trust_remote_code: bool, what: str):
    """Build the model on the meta device (shapes only) in the dtype it is counted in."""
    from transformers import AutoModelForCausalLM

    torch_dtype = _TORCH.get(dtype, torch.bfloat16)
    config = _without_quantization(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ModelError(f"{what}: not a causal language model transformers can build "
                         f"({str(exc).splitlines()[0]})") from None
    except (RuntimeError, TypeError, IndexError) as exc:  # e.g. a shape no tensor can take
        raise ModelError(f"{what}: transformers cannot build this config ("
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         f"check the config overrides") from None
    build_expert_map(model, what)  # raises ModelError for dense models
    return model


def _without_quantization(config):
    if getattr(config, "quantization_config", None) is None:
        return config
    config = type(config).from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _from_pretrained(path: Path, config, ckpt_dtype: str, torch_dtype, trust_remote_code: bool):
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = dict(dtype=torch_dtype, use_safetensors=True,
                                  trust_remote_code=trust_remote_code)
    if ckpt_dtype == "fp8_e4m3":
        kwargs["config"] = _without_quantization(config)
        kwargs["state_dict"] = dequantized_fp8_state_dict(path)
    elif ckpt_dtype == "mxfp4":  # dequantized exactly here (transformers' needs accelerate)
        kwargs["config"] = _without_quantization(config)
        kwargs["state_dict"] = dequantized_mxfp4_state_dict(path, config)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # moesz reports progress through its own callbacks
    try:
        if "state_dict" in kwargs:  # transformers takes a state dict only without a path
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(kwargs["config"])]
            kwargs.pop("trust_remote_code")
            return cls.from_pretrained(None, **kwargs)
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot load the checkpoint ({_first_line(exc)})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _tokenizer(path: Path, trust_remote_code: bool):
    """The checkpoint's tokenizer: moesz's character tokenizer (the built-in model's, which
    random checkpoints carry too), a Hugging Face one, or None when there are no tokenizer files.
    """
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                             "tokenizer.model")):
        return None
    f = path / "tokenizer.json"
    try:
        char = f.is_file() and json.loads(f.read_text()).get("kind") == "char_tokenizer"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        char = False
    if char:
        from profiles.tasks import CharTokenizer

        return CharTokenizer.load(f)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 — a foreign file raises KeyError, TypeError, the
        # tokenizers library's own Exception, …; each means the same to the user
        raise ModelError(f"{path}: tokenizer files cannot be read as a Hugging Face tokenizer "
                         f"({_first_line(exc)}); remove or replace tokenizer.json / "
                         f"tokenizer_config.json") from None


def builtin_dir() -> Path:
    """Where the built-in model lives (`profiles.builtin.builtin_dir()`, which honours
    MOESZ_BUILTIN_DIR)."""
    try:
        from profiles.builtin import builtin_dir as _dir
    except ImportError:
        return BUILTIN_DIR
    return _dir()


def _load_builtin(torch_dtype=None):
    try:
        from profiles.builtin import load_builtin
    except ImportError:
        raise ModelError("built-in model weights are not built yet; train them with "
                         "`python -m profiles.builtin.train` or pass a local checkpoint "
                         "directory") from None
    return load_builtin() if torch_dtype is None else load_builtin(dtype=torch_dtype)


def _load_dtype(name: str) -> torch.dtype:
    name = check_dtype(name, "dtype")
    if name not in _TORCH:
        raise ModelError(f"dtype {name!r} cannot be loaded into; choose bf16, fp16 or fp32")
    return _TORCH[name]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
