"""Random-weight models of a real geometry: measure the runtime where no checkpoint is at hand.

`random_model("arch:mixtral,num_hidden_layers=4", "cuda")` builds transformers' model of that
config directly on the device with its own (seeded) initialisation — the expert shapes, hence the
bytes that cross the link and the decode work, are the real model's; the weights and the routing
are not (routing of a random model is close to uniform). Fidelity checks use it for geometries too
big to ship (issue 8: "a random-weight model of real expert geometry").
"""

from __future__ import annotations

import torch

from profiles.errors import ConfigError, ModelError

_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def is_geometry_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(("arch:", "preset:"))


def random_model(spec: str, device: str | torch.device = "cpu", seed: int = 0):
    """A `LoadedModel` with random weights of geometry `spec` (`arch:…`, `preset:…`) on `device`.

    Raises:
        ModelError: an unknown spec, or a quantized dtype (random bf16/fp16/fp32 only).
        ConfigError: the model does not fit the device's free memory.
    """
    from transformers import AutoModelForCausalLM

    from profiles.models import LoadedModel, build_expert_map, model_fingerprint, resolve_geometry
    from profiles.models.loading import _config_for, _parse_spec
    from profiles.models.presets import get_preset

    geometry = resolve_geometry(spec)
    if geometry.dtype not in _TORCH:
        raise ModelError(f"{spec}: random weights are built in bf16, fp16 or fp32, not "
                         f"{geometry.dtype}; add dtype=bf16 to the spec")
    dev = torch.device(device)
    free = (torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda"
            else _host_available_bytes())
    if geometry.total_bytes * 1.2 > free:
        raise ConfigError(f"{spec}: {geometry.total_bytes / 2**30:.1f} GiB of weights do not fit "
                          f"the {free / 2**30:.1f} GiB free on {dev}; use fewer layers "
                          f"(num_hidden_layers=N)")
    kind, arg, overrides = _parse_spec(spec)
    overrides.pop("dtype", None)
    if kind == "preset":
        preset = get_preset(arg)
        config = _config_for(arg, preset.architecture, {**preset.config, **overrides})
    else:
        config = _config_for(spec, arg, overrides)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=_TORCH[geometry.dtype])
    model.eval()
    emap = build_expert_map(model, spec)
    return LoadedModel(model=model, tokenizer=None, geometry=geometry, expert_map=emap,
                       fingerprint=model_fingerprint(emap),
                       spec=f"{spec} (random weights, seed {seed})")


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
