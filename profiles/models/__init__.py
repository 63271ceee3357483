"""Models: the expert map, geometry, named presets, checkpoint loading and fingerprints."""

from profiles.models.expert_map import ExpertMap, ExpertRef, build_expert_map
from profiles.models.fingerprint import model_fingerprint
from profiles.models.geometry import DTYPES, ModelGeometry, tensor_storage_bytes
from profiles.models.loading import (
    CheckpointInfo,
    LoadedModel,
    checkpoint_info,
    load_model,
    open_checkpoint,
    resolve_geometry,
)
from profiles.models.presets import PRESETS, Preset, get_preset, list_presets

__all__ = [
    "CheckpointInfo", "DTYPES", "ExpertMap", "ExpertRef", "LoadedModel", "ModelGeometry", "PRESETS", "Preset",
    "build_expert_map", "checkpoint_info", "get_preset", "list_presets", "load_model", "model_fingerprint",
    "open_checkpoint", "resolve_geometry", "tensor_storage_bytes",
]
