"""The host-side expert store: every routed expert as its packed record in (pinned) host memory.

One record per expert holds its tensors' blobs exactly as a packed checkpoint stores them
(`profiles.packed`: codec-layer blobs, payloads 16-byte aligned). On a miss the runtime copies the
whole record to the device in one transfer and decodes the payloads in place, so the bytes that
cross the link are the record's bytes. Records come from a packed checkpoint's files (read once
into page-locked buffers) or are encoded from an in-memory model under a policy (the same
`profiles.packed.encode_expert`, so both paths hold identical bytes).

Where an expert decodes: on the device when every blob has an in-place device decoder (`raw`,
`szp`, `cuszp`, `ans`; see `device_decode`); otherwise (`sz3`, `lossless`, a lossless fallback inside a
record, and `rtn8`/`rtn4`, which have no in-place decoder yet) on host worker threads, after which
the raw decoded bytes are sent — as the simulator's cost model says for CPU codecs
(`sim/costs.py`; it models rtn as GPU-decoded, a known difference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from profiles.errors import PolicyError

Key = tuple[int, int]
DEFAULT_DISK_DEPTH = 4     # reads in flight when neither the serving config nor a profile says
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TensorBlob:
    """One tensor of an expert record: its parsed blob (payload viewing the record) and where its
    payload starts inside the record."""

    name: str
    blob: Any                # profiles.codecs.Blob
    payload_offset: int


@dataclass(frozen=True)
class ExpertRecord:
    """One routed expert in host memory."""

    layer: int
    expert: int
    spec: str
    host: torch.Tensor       # uint8 record bytes (page-locked when CUDA is used)
    tensors: tuple[TensorBlob, ...]
    original_nbytes: int     # the expert in its original dtype
    device_decodable: bool   # every payload decodes on the device
    layout: Any = None       # the model's GateUpLayout: joins gate and up stored apart

    def join(self, weights: dict) -> dict:
        """Decoded tensors by the model's names (gate and up parts joined into gate_up_proj)."""
        from profiles.models.gate_up import join_expert

        return join_expert(weights, self.layout)

    @property
    def joins(self) -> bool:
        """Whether decoding joins gate and up parts (a new tensor, not views of the record)."""
        from profiles.models.gate_up import PARTS

        parts = {p for pair in PARTS.values() for p in pair}
        return any(t.name in parts for t in self.tensors)

    @property
    def key(self) -> Key:
        return (self.layer, self.expert)

    @property
    def stored_nbytes(self) -> int:
        """Bytes held in host memory (blobs and alignment padding)."""
        return int(self.host.numel())

    @property
    def link_nbytes(self) -> int:
        """Bytes copied host -> device on a miss: the record, or the decoded bytes (CPU codecs)."""
        return self.stored_nbytes if self.device_decodable else self.original_nbytes

    @property
    def codecs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.blob.codec for t in self.tensors))


@dataclass(frozen=True)
class RecordInfo:
    """What the runtime plans with about an expert before reading it: sizes and where it
    decodes (from the record itself, or from a packed manifest for records left on disk)."""

    stored_nbytes: int
    original_nbytes: int
    device_decodable: bool
    codecs: tuple[str, ...]

    @property
    def link_nbytes(self) -> int:
        return self.stored_nbytes if self.device_decodable else self.original_nbytes

    @classmethod
    def of(cls, r: "ExpertRecord") -> "RecordInfo":
        return cls(r.stored_nbytes, r.original_nbytes, r.device_decodable, r.codecs)


class DiskRecords:
    """A packed checkpoint's records read from its layer files on demand, with an LRU of at most
    `budget_bytes` in host memory: the disk tier, for experts that do not fit the host budget.

    Reads bypass the page cache (`read_method`, see `profiles.packed.read.RecordFiles`) so that
    a run measures the disk, not RAM, and up to `depth` run at once on a thread pool (`request`),
    as NVMe drives need several reads in flight to reach their bandwidth. Every read is counted
    (`reads`, `read_bytes`) and, with a `timeline`, recorded on its "SSD read" track."""

    def __init__(self, ckpt, budget_bytes: int, pin: bool = False, depth: int = 4,
                 read_method: str = "direct") -> None:
        from collections import OrderedDict
        from concurrent.futures import ThreadPoolExecutor

        from profiles.packed.read import RecordFiles

        self.ckpt, self.budget, self.pin, self.depth = ckpt, int(budget_bytes), pin, int(depth)
        self.entries = {e.key: e for e in ckpt.experts}
        self.layout = _layout(ckpt)
        self.cache: "OrderedDict[Key, ExpertRecord]" = OrderedDict()
        self.held = self.peak = self.reads = self.read_bytes = 0
        self.files = RecordFiles(ckpt, read_method)
        self.pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="moesz-disk")
        self.timeline = None            # set by the runtime: reads become "SSD read" spans
        self._pending: dict = {}
        self._infos: dict[Key, RecordInfo] | None = None

    @property
    def read_method(self) -> str:
        """How reads treat the page cache: direct, fadvise or cached."""
        return self.files.method

    def __getitem__(self, key: Key) -> "ExpertRecord":
        return self.request(key).result()

    def held_in_memory(self, key: Key) -> bool:
        """Whether the record is in the host LRU (a request would not read the disk)."""
        return self.cache.get(key) is not None

    def request(self, key: Key):
        """A `Future` of the record: done at once when it is in host memory, else read on the
        disk pool (up to `depth` reads in flight). The LRU takes the record's place when it is
        requested (evicting the least recently used as needed), as the simulator's disk tier
        does. Call `result()` from the thread that owns this object."""
        from concurrent.futures import Future

        if key in self.cache:
            self.cache.move_to_end(key)
            rec = self.cache[key]
            if rec is not None:
                fut: Future = Future()
                fut.set_result(rec)
                return fut
            return self._pending[key]          # its read is still in flight
        size = self.entries[key].size
        self.cache[key] = None                 # a place for the record while it is read
        self.held += size
        while self.held > self.budget and len(self.cache) > 1:
            old, rec = self.cache.popitem(last=False)
            self.held -= self.entries[old].size
        self.peak = max(self.peak, self.held)
        self.reads += 1               # counted when issued, as the simulator counts its reads:
        self.read_bytes += size       # one still in flight at the end of a run is in its figures
        pending = self._pending[key] = _Read(self, key, self.pool.submit(self._load, key))
        return pending

    def _load(self, key: Key) -> "ExpertRecord":
        """Read and parse one record (on a pool thread; touches no shared state)."""
        import time

        e = self.entries[key]
        t0 = time.perf_counter()
        host = self.files.read(e, self.pin)
        rec = _record(e.layer, e.expert, e.spec, host, e.blobs, e.original_bytes,
                      f"{self.ckpt.path / e.file} layer {e.layer} expert {e.expert}", self.layout)
        t1 = time.perf_counter()     # the span covers the read and the record's CRC32 check
        tl = self.timeline
        if tl is not None:
            from profiles.runtime.timeline import Job

            tl.host("SSD read", Job("read", key, e.size), t0 - tl._t0, t1 - tl._t0)
        return rec

    def clear(self) -> None:
        """Empty the host LRU (a cold start, as the simulator's disk tier begins)."""
        for pending in list(self._pending.values()):
            pending.future.result()          # let reads in flight land before forgetting them
        self._pending.clear()
        self.cache.clear()
        self.held = 0

    def _landed(self, read: "_Read", rec: "ExpertRecord") -> None:
        """A read's record arrived: it fills its place in the LRU unless that was evicted."""
        if self._pending.get(read.key) is read:
            del self._pending[read.key]
        if read.key in self.cache and self.cache[read.key] is None:
            self.cache[read.key] = rec

    def close(self) -> None:
        """Stop the read pool (reads not started are dropped) and close the layer files (records
        already read stay usable)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.files.close()

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def infos(self) -> dict[Key, RecordInfo]:
        """Sizes and decode place of every record, from the manifest and each blob's header
        (a few hundred bytes read per blob, once): a blob stored as a lossless fallback decodes
        on the host whatever the spec's codec, as `ExpertRecord.device_decodable` says."""
        if self._infos is None:
            self._infos = {key: self._info(e) for key, e in self.entries.items()}
        return self._infos

    def _info(self, e) -> RecordInfo:
        from profiles.codecs import Blob
        from profiles.errors import CodecError
        from profiles.packed.records import PackedError
        from profiles.runtime.device_decode import decodes_in_place

        codecs, decodable = [], True
        for b in e.blobs:
            where = f"{self.ckpt.path / e.file} layer {e.layer} expert {e.expert} {b.name}"
            try:
                head = Blob.read_header(self.files.read_bytes(e, b.offset,
                                                              b.payload_offset - b.offset), where)
                codec, fallback = str(head["codec"]), bool(head["lossless_fallback"])
            except (CodecError, KeyError) as exc:
                raise PackedError(f"{exc}; repack the model") from None
            codecs.append(codec)
            decodable = decodable and decodes_in_place(codec) and not fallback
        return RecordInfo(e.size, e.original_bytes, decodable, tuple(dict.fromkeys(codecs)))



class _Read:
    """A disk read in flight: `result()` waits for it and inserts the record into the LRU."""

    __slots__ = ("records", "key", "future")

    def __init__(self, records: DiskRecords, key: Key, future) -> None:
        self.records, self.key, self.future = records, key, future

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> "ExpertRecord":
        rec = self.future.result()
        self.records._landed(self, rec)
        return rec


def _device_decodable(blobs: Iterable[Any]) -> bool:
    from profiles.runtime.device_decode import decodes_in_place

    return all(decodes_in_place(b.codec) and not b.lossless_fallback for b in blobs)


def _record(layer: int, expert: int, spec: str, host: torch.Tensor, entries, original: int,
            where: str, layout=None) -> ExpertRecord:
    from profiles.packed import parse_blob

    tensors = tuple(TensorBlob(b.name, parse_blob(host, b, f"{where} {b.name}"),
                               b.payload_offset) for b in entries)
    return ExpertRecord(layer, expert, spec, host, tensors, original,
                        _device_decodable(t.blob for t in tensors), layout)


def _layout(ckpt):
    """A packed checkpoint's GateUpLayout (from its architecture; None where unknown)."""
    from profiles.models.gate_up import gate_up_layout

    return gate_up_layout(ckpt.manifest.get("geometry", {}).get("architecture"))


class ExpertStore:
    """All routed experts of one model under one policy, in host memory.

    Attributes:
        records: (layer, expert) -> `ExpertRecord`.
        policy: the `Policy` the records were encoded with.
        fingerprint: the original model's fingerprint.
        source: where the records came from (a packed directory, or "encoded in memory").
    """

    def __init__(self, records: dict[Key, ExpertRecord], policy, fingerprint: str | None,
                 source: str) -> None:
        self.records = records
        self.policy = policy
        self.fingerprint = fingerprint
        self.source = source

    def __getitem__(self, key: Key) -> ExpertRecord:
        return self.records[key]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def on_disk(self) -> bool:
        """Whether records are read from disk on demand (the disk tier)."""
        return isinstance(self.records, DiskRecords)

    def infos(self) -> dict[Key, RecordInfo]:
        """Sizes and decode place of every expert, without reading any from disk."""
        if self.on_disk:
            return self.records.infos()
        return {k: RecordInfo.of(r) for k, r in self.records.items()}

    @property
    def host_bytes(self) -> int:
        """Host memory held by the expert records (pinned when CUDA is used): all of them, or
        the disk tier's host budget."""
        if self.on_disk:
            return min(self.records.budget, self.stored_bytes)
        return self.stored_bytes

    @property
    def stored_bytes(self) -> int:
        """Bytes of every expert record, wherever it is held."""
        return sum(i.stored_nbytes for i in self.infos().values())

    @property
    def original_bytes(self) -> int:
        return sum(i.original_nbytes for i in self.infos().values())

    @classmethod
    def from_loaded(cls, loaded, policy, pin: bool = False, progress: Progress | None = None,
                    encode_device: torch.device | None = None) -> "ExpertStore":
        """Encode every routed expert of a `LoadedModel` under `policy` into host records.

        Raises:
            PolicyError: the policy does not fit the model (fingerprint, layers, experts).
        """
        from profiles.packed.records import shipped_spec

        emap = loaded.expert_map
        policy.check(emap.moe_layers, emap.experts_per_layer, loaded.fingerprint,
                     tensor_names=[n for n, _ in emap.expert_tensor_shapes],
                     architecture=loaded.geometry.architecture)
        if getattr(loaded, "offload", None) is not None:
            from profiles.errors import ConfigError

            raise ConfigError(f"{loaded.spec}: its experts are served from disk; pack it "
                              f"(`moesz pack`) and run the packed directory")
        from profiles.models.gate_up import gate_up_layout

        return cls.from_tensors(((r.layer, r.expert, r.tensors) for r in emap.experts), policy,
                                loaded.fingerprint, pin, len(emap.experts), progress,
                                encode_device, raw_as=shipped_spec(loaded.geometry.dtype),
                                layout=gate_up_layout(loaded.geometry.architecture))

    @classmethod
    def from_tensors(cls, experts: Iterable[tuple[int, int, dict[str, torch.Tensor]]], policy,
                     fingerprint: str | None, pin: bool = False, total: int | None = None,
                     progress: Progress | None = None,
                     encode_device: torch.device | None = None, raw_as=None,
                     layout=None) -> "ExpertStore":
        """Encode (layer, expert, tensors) triples under `policy` into host records.

        Args:
            encode_device: move each tensor there to encode (a CUDA device encodes `szp` with the
                fused Triton kernel; streams are byte-identical to the CPU encoder's).
            raw_as: how `raw` stores matrices of a checkpoint shipped quantized
                (`profiles.packed.records.shipped_spec`).
            layout: the model's `GateUpLayout`, to store gate and up apart where the policy
                says (`profiles.models.gate_up`).
        """
        import dataclasses

        import numpy as np

        from profiles.packed import encode_expert

        pin = pin and torch.cuda.is_available()
        records: dict[Key, ExpertRecord] = {}
        for i, (layer, expert, tensors) in enumerate(experts):
            spec = policy.expert_specs(layer, expert)
            if encode_device is not None:
                tensors = {n: t.to(encode_device) for n, t in tensors.items()}
            enc = encode_expert(tensors, spec, digests=False, raw_as=raw_as, layout=layout)
            host = torch.zeros(enc.size, dtype=torch.uint8, pin_memory=pin)
            arr = host.numpy()
            for off, raw in enc.parts:
                arr[off: off + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            blobs = tuple(
                TensorBlob(e.name, dataclasses.replace(
                    b, payload=arr[e.payload_offset: e.payload_offset + b.payload_nbytes]),
                    e.payload_offset)
                for e, b in zip(enc.entries, enc.blobs))
            records[(layer, expert)] = ExpertRecord(
                layer, expert, spec.describe(), host, blobs, enc.original_nbytes,
                _device_decodable(t.blob for t in blobs), layout)
            if progress is not None:
                progress(i + 1, total or 0, f"layer {layer} expert {expert}")
        return cls(records, policy, fingerprint, "encoded in memory")

    @classmethod
    def from_packed(cls, ckpt, pin: bool = False, host_budget_bytes: int | None = None,
                    disk_depth: int | None = None, read_method: str = "direct"
                    ) -> "ExpertStore":
        """Read a packed checkpoint's expert files into (pinned) host memory and parse every blob
        (CRC32 checked); `ckpt` is a `profiles.packed.PackedCheckpoint`. With a host budget
        below the packed expert bytes, records stay on disk and are read on demand through an
        LRU of that many bytes (`DiskRecords`), `disk_depth` reads in flight (default 4),
        bypassing the page cache as `read_method` says."""
        from profiles.packed import read_expert_files

        if host_budget_bytes is not None and host_budget_bytes < ckpt.stored_expert_bytes:
            depth = disk_depth or DEFAULT_DISK_DEPTH
            return cls(DiskRecords(ckpt, host_budget_bytes, pin, depth, read_method), ckpt.policy,
                       ckpt.fingerprint, f"{ckpt.path} (disk tier, {host_budget_bytes} bytes in "
                       f"host memory, {depth} reads in flight)")

        files = read_expert_files(ckpt, pin=pin)
        records, layout = {}, _layout(ckpt)
        for e in ckpt.experts:
            host = files[e.file][e.offset: e.offset + e.size]
            records[e.key] = _record(e.layer, e.expert, e.spec, host, e.blobs, e.original_bytes,
                                     f"{ckpt.path / e.file} layer {e.layer} expert {e.expert}",
                                     layout)
        return cls(records, ckpt.policy, ckpt.fingerprint, str(ckpt.path))

    def check_model(self, moe_layers, experts_per_layer: int) -> None:
        """Raise PolicyError unless the store holds every expert of a model with this shape."""
        want = {(layer, e) for layer in moe_layers for e in range(experts_per_layer)}
        missing = sorted(want - set(iter(self.records)))
        if missing:
            layer, e = missing[0]
            raise PolicyError(f"expert store ({self.source}) lacks layer {layer} expert {e}; it "
                              f"was packed for another model")
