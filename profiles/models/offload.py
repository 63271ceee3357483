"""Evaluate a model whose routed experts do not fit in host memory: experts stay on disk.

The model is built with its non-expert weights loaded (tensor by tensor from the files) and every
MoE layer's experts module pointed at ONE set of shared buffers, the shape of one layer's fused
experts. A forward pre-hook on each experts module fills, before the layer runs, the buffer rows
of exactly the experts its tokens are routed to, and transformers' own experts forward then runs
unchanged: it reads only the routed experts' rows (`expert_hit`), so the logits are bit for bit
those of the whole model in memory with the same weights.

Where the routed experts come from (`ExpertReader`):

- a checkpoint's files (`FileReader`), optionally under a storage policy: each expert is read,
  encoded with the policy's codec and decoded — the policy's real blobs, not a copy of the model
  edited in place;
- a packed checkpoint (`PackedReader`): each expert's record is read from its layer file and its
  blobs decoded.

An LRU of expert records (encoded bytes, or raw tensors) bounded by `host_budget_bytes` sits in
front of the disk: memory is the non-expert weights, one layer of expert buffers, and the budget.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from profiles.errors import ModelError

Key = tuple[int, int]
# what transformers' experts modules call the routed expert indices (their second argument)
_INDEX_NAMES = ("top_k_index", "router_indices", "topk_indices", "selected_experts")


@dataclass
class Record:
    """One expert held in host memory: decoded tensors (raw storage) or codec blobs."""

    tensors: dict[str, torch.Tensor] | None
    blobs: dict[str, Any] | None      # name -> profiles.codecs.Blob
    nbytes: int                       # host bytes it holds


class FileReader:
    """Experts from a checkpoint's files, stored as `policy` says (None: as on disk)."""

    def __init__(self, source, policy=None) -> None:
        self.source, self.policy = source, policy

    def read(self, key: Key) -> Record:
        from profiles.models.gate_up import gate_up_layout
        from profiles.packed.records import encode_expert

        tensors = self.source.expert_tensors(*key)
        spec = None if self.policy is None else self.policy.expert_specs(*key)
        if spec is None or (spec.uniform is not None and spec.uniform.codec == "raw"):
            return Record(tensors, None, sum(t.numel() * t.element_size()
                                             for t in tensors.values()))
        enc = encode_expert(tensors, spec, digests=False,
                            layout=gate_up_layout(self.source.geometry.architecture))
        return Record(None, {e.name: b for e, b in zip(enc.entries, enc.blobs)}, enc.size)


class PackedReader:
    """Experts from a packed checkpoint's layer files (each record's CRC32s checked)."""

    def __init__(self, ckpt) -> None:
        from profiles.packed.read import RecordFiles

        self.ckpt = ckpt
        self.entries = {e.key: e for e in ckpt.experts}
        self.files = RecordFiles(ckpt)

    def read(self, key: Key) -> Record:
        from profiles.packed import parse_blob

        e = self.entries[key]
        host = self.files.read(e)
        where = f"{self.ckpt.path / e.file} layer {e.layer} expert {e.expert}"
        blobs = {b.name: parse_blob(host, b, f"{where} {b.name}") for b in e.blobs}
        return Record(None, blobs, e.size)

    def close(self) -> None:
        """Close the layer files."""
        self.files.close()


@dataclass
class OffloadStats:
    """What serving the experts cost (measured counts)."""

    reads: int = 0                 # experts read from disk
    read_bytes: int = 0            # host bytes of the records read
    hits: int = 0                  # experts found in the host LRU
    host_peak_bytes: int = 0       # most bytes the LRU held
    fills: int = 0                 # expert rows written into the layer buffers
    layers_seen: set = field(default_factory=set)


class OffloadedExperts:
    """Serve a model's routed experts from `reader` into shared layer buffers on demand.

    Args:
        model: the transformers model (its routed-expert parameters are replaced).
        expert_map: its `ExpertMap` (fused experts modules only).
        reader: where experts come from (`FileReader`, `PackedReader`).
        host_budget_bytes: bytes of expert records the host LRU may hold (None: all).
    """

    def __init__(self, model, expert_map, reader, host_budget_bytes: int | None = None) -> None:
        self.model, self.emap, self.reader = model, expert_map, reader
        self.budget = host_budget_bytes
        self.cache: OrderedDict[Key, Record] = OrderedDict()
        self.cache_bytes = 0
        self.stats = OffloadStats()
        self._hooks: list = []
        self.buffers = self._share_buffers()
        for layer, mod in expert_map.expert_modules.items():
            self._hooks.append(mod.register_forward_pre_hook(
                lambda m, args, kwargs, layer=layer: self._fill(layer, args, kwargs),
                with_kwargs=True))

    def _share_buffers(self) -> dict[str, torch.Tensor]:
        """Point every layer's per-expert parameters at one set of buffers of one layer's shape
        (left untouched, so untouched rows cost no memory)."""
        if any(isinstance(m, torch.nn.ModuleList) for m in self.emap.expert_modules.values()):
            raise ModelError("experts kept one module per expert (remote code) cannot be served "
                             "from disk; load the model into memory instead (no --host-mem)")
        first = self.emap.expert_modules[self.emap.moe_layers[0]]
        num = self.emap.experts_per_layer
        buffers = {n: torch.empty_like(p, device="cpu")
                   for n, p in first.named_parameters(recurse=False)
                   if p.ndim >= 2 and p.shape[0] == num}
        for mod in self.emap.expert_modules.values():
            for name, buf in buffers.items():
                if tuple(getattr(mod, name).shape) != tuple(buf.shape):
                    raise ModelError(f"MoE layers differ in the shape of {name}; moesz serves "
                                     f"experts from disk for models with one expert shape")
                setattr(mod, name, torch.nn.Parameter(buf, requires_grad=False))
        return buffers

    def _fill(self, layer: int, args, kwargs) -> None:
        index = next((kwargs[k] for k in _INDEX_NAMES if k in kwargs),
                     args[1] if len(args) > 1 else None)
        if not isinstance(index, torch.Tensor) or index.is_floating_point() \
                or index.dtype == torch.bool:
            what = "without them" if index is None else f"with {_describe(index)} instead"
            raise ModelError(f"the experts module of layer {layer} was called {what}, but serving "
                             f"experts from disk needs the routed expert indices (top_k_index, an "
                             f"integer tensor); load this architecture into memory (no "
                             f"--host-mem)")
        self.stats.layers_seen.add(layer)
        for e in torch.unique(index).tolist():
            if 0 <= e < self.emap.experts_per_layer:
                self._write(layer, e, self.record((layer, e)))

    def record(self, key: Key) -> Record:
        rec = self.cache.get(key)
        if rec is not None:
            self.cache.move_to_end(key)
            self.stats.hits += 1
            return rec
        rec = self.reader.read(key)
        self.stats.reads += 1
        self.stats.read_bytes += rec.nbytes
        if self.budget is None or rec.nbytes <= self.budget:
            self.cache[key] = rec
            self.cache_bytes += rec.nbytes
            while self.budget is not None and self.cache_bytes > self.budget:
                _, old = self.cache.popitem(last=False)
                self.cache_bytes -= old.nbytes
            self.stats.host_peak_bytes = max(self.stats.host_peak_bytes, self.cache_bytes)
        return rec

    def _write(self, layer: int, e: int, rec: Record) -> None:
        from profiles.codecs import decode
        from profiles.models.gate_up import gate_up_layout, join_expert

        if rec.tensors is not None:
            values = rec.tensors
        else:   # gate and up stored apart are joined back into gate_up_proj
            values = join_expert({n: decode(b) for n, b in rec.blobs.items()},
                                 gate_up_layout(self.model.config.model_type))
        with torch.no_grad():
            for name, buf in self.buffers.items():
                buf[e].copy_(values[name].reshape(buf.shape[1:]))
        self.stats.fills += 1

    @contextmanager
    def using(self, reader) -> Iterator[None]:
        """Serve from `reader` (another policy's blobs) inside the block, then as before. The
        host cache is emptied on the way in and out (keeping the records cached before the block
        would hold them on top of the budget)."""
        old, self.reader = self.reader, reader
        self.cache, self.cache_bytes = OrderedDict(), 0
        try:
            yield
        finally:
            self.reader = old
            self.cache, self.cache_bytes = OrderedDict(), 0

    def close(self) -> None:
        """Remove the hooks and close the reader's files."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if hasattr(self.reader, "close"):
            self.reader.close()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor"
    return f"a {type(value).__name__}"


def offload_summary(loaded) -> dict:
    """What serving `loaded`'s experts from disk did (measured counts), for output documents."""
    from profiles.packed.write import peak_rss_bytes

    s = loaded.offload.stats
    return {"host_budget_bytes": loaded.offload.budget, "expert_reads": s.reads,
            "read_bytes": s.read_bytes, "host_hits": s.hits,
            "host_peak_bytes": s.host_peak_bytes, "peak_rss_bytes": peak_rss_bytes()}


def build_offloaded(source, reader, host_budget_bytes: int | None, trust_remote_code: bool = False
                    ) -> tuple[Any, Any, OffloadedExperts]:
    """(model, expert map, OffloadedExperts) of a checkpoint whose experts stay on disk.

    Args:
        source: a `profiles.models.source.FileExperts` (its config, non-expert weights and
            in-memory dtype are used).
        reader: where the experts come from.
        host_budget_bytes: the host LRU's budget.

    Raises:
        ModelError: the config cannot be built, or a non-expert weight the model needs is missing
            from the files.
    """
    from transformers import AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5.20 kept it in modeling_utils
        from transformers.modeling_utils import no_init_weights

    from profiles.models.expert_map import build_expert_map

    try:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(source.config, dtype=source.dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{source.path}/config.json: cannot build the model "
                         f"({str(exc).splitlines()[0]})") from None
    if getattr(source.config, "tie_word_embeddings", False):
        model.tie_weights()
    emap = build_expert_map(model, source.spec)
    offload = OffloadedExperts(model, emap, reader, host_budget_bytes)
    stored = dict(source.geometry.expert_tensor_shapes)
    for name, buf in offload.buffers.items():
        if name in stored and tuple(stored[name]) != tuple(buf.shape[1:]):
            raise ModelError(f"{source.path}: expert tensor {name} is "
                             f"{'x'.join(map(str, stored[name]))} in the files, but the model "
                             f"config.json describes has {'x'.join(map(str, buf.shape[1:]))}; "
                             f"the checkpoint and config.json disagree")
    load_non_expert(model, emap, source.non_expert_tensors(), str(source.path))
    model.eval()
    return model, build_expert_map(model, source.spec), offload


def load_non_expert(model, emap, tensors, where: str) -> None:
    """Copy (in-memory name, `TensorOut`) pairs into `model`, one tensor at a time; every
    parameter that is not a routed expert must be among them (tied ones excepted)."""
    import numpy as np

    from profiles.models.files import ST_DTYPES
    from profiles.packed.records import routed_parameter_names

    params = dict(model.named_parameters(remove_duplicate=False))
    params.update({n: b for n, b in model.named_buffers()})
    loaded = set()
    with torch.no_grad():
        for name, out in tensors:
            target = params.get(name)
            if target is None:
                raise ModelError(f"{where}: weight {name} does not belong to this "
                                 f"{model.config.model_type} model; the checkpoint and "
                                 f"config.json disagree")
            if tuple(target.shape) != tuple(out.shape):
                raise ModelError(f"{where}: weight {name} is {'x'.join(map(str, out.shape))} "
                                 f"in the files, {'x'.join(map(str, target.shape))} in the model "
                                 f"config.json describes; the checkpoint and config.json "
                                 f"disagree")
            raw = np.concatenate([np.asarray(c).reshape(-1).view(np.uint8)
                                  for c in out.chunks()]) if out.nbytes else np.zeros(0, np.uint8)
            t = torch.from_numpy(raw).view(ST_DTYPES[out.dtype][2]).reshape(out.shape)
            target.copy_(t)
            loaded.add(target.data_ptr())
    routed = routed_parameter_names(model, emap)
    missing = [n for n, p in model.named_parameters(remove_duplicate=False)
               if n not in routed and p.data_ptr() not in loaded]
    if missing:
        raise ModelError(f"{where}: weight {missing[0]} is missing from the files; the "
                         f"checkpoint is incomplete or of another architecture")
