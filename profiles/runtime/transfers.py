"""Moving experts to the device: host-to-device copies on a side stream, device and host decoding.

- Device-decodable records (`raw`, `szp`, `cuszp`): the record's bytes are copied on the copy
  stream (page-locked source, asynchronous), then each payload is decoded in place on the decode
  stream (`gpu_decode="stream"`) or on the compute stream (`gpu_decode="compute"`), waiting for the
  copy with a CUDA event. With compressed residency the record stays on the device as copied and
  is decoded on every use.
- Host-decoded records (`sz3`, `lossless`, ...): a worker thread decodes the blobs on the CPU and
  sends the decoded bytes on the copy stream.
- On a CPU device the same steps run with the CPU as the device: the copy is a memcpy, decoding
  runs in the calling thread (host codecs still on the workers), and everything is timed.

This follows the transfer pipeline of the simulator (`sim/engine.py`) and of offloading systems
such as mixtral-offloading (copy on a side stream while the previous expert computes).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from profiles.runtime.device_decode import decode_payload
from profiles.runtime.store import ExpertRecord
from profiles.runtime.timeline import Job, Timeline

Weights = dict[str, torch.Tensor]


class FetchJob:
    """One expert on its way to the device.

    Exactly one of `weights` (decoded tensors) and `payload` (the record's device copy, for
    compressed residency) is set once the job is done; `ready` is the CUDA event after which they
    may be used (None on a CPU device), `future` the worker's result for host-decoded records.
    """

    __slots__ = ("key", "kind", "record", "weights", "payload", "ready", "future", "reading",
                 "handoff")

    def __init__(self, key, kind: str, record: ExpertRecord | None) -> None:
        self.key, self.kind, self.record = key, kind, record
        self.weights: Weights | None = None
        self.payload: torch.Tensor | None = None
        self.ready = None
        self.future: Future | None = None
        self.reading = None     # the disk read of a record not in host memory (disk tier)
        self.handoff: Future | None = None  # -> the worker's decode, started when the read lands

    def done(self) -> bool:
        """Whether the expert has arrived, or its disk read finished (never blocks)."""
        if self.reading is not None:
            return self.reading.done()
        if self.future is not None and not self.future.done():
            return False
        return self.ready is None or self.ready.query()

    def wait(self, stream=None) -> None:
        """Block the host until a host-side decode finished; make `stream` wait for the device."""
        if self.future is not None:
            self.weights, self.ready = self.future.result()
            self.future = None
        if self.ready is not None:
            (stream or torch.cuda.current_stream()).wait_event(self.ready)


class Transfers:
    """Streams, worker threads and the copy/decode steps of one runtime."""

    def __init__(self, device: torch.device, timeline: Timeline, gpu_decode: str = "stream",
                 cpu_workers: int = 8) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.tl = timeline
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.decode_stream = (torch.cuda.Stream(device) if self.cuda and gpu_decode == "stream"
                              else None)
        self.decode_track = "GPU decode" if gpu_decode == "stream" else "GPU compute"
        self.pool = ThreadPoolExecutor(max_workers=cpu_workers, thread_name_prefix="moesz-decode")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    # -- steps -------------------------------------------------------------------------------
    def fetch_after_read(self, key, reading, kind: str) -> FetchJob:
        """A fetch whose record is still being read from disk (`reading`: a disk-tier request);
        `complete` moves it on once the read is done. Host-codec records are decoded by a worker
        as soon as their read finishes."""
        job = FetchJob(key, kind, None)
        job.reading = reading
        handoff = job.handoff = Future()

        def chain(read: Future) -> None:     # on the disk thread that finished the read
            try:
                record = read.result()
                decoding = None if record.device_decodable else self.pool.submit(
                    self._host_decode_and_send, record, kind)
            except BaseException as exc:     # the model's thread raises it in `complete`
                handoff.set_exception(exc)   # (a read error; or the runtime already closed)
                return
            handoff.set_result(decoding)

        getattr(reading, "future", reading).add_done_callback(chain)
        return job

    def complete(self, job: FetchJob, keep_compressed: bool) -> None:
        """Start the copy (and decode) of a job whose disk read has finished (waits for it)."""
        if job.reading is None:
            return
        record = job.reading.result()
        job.reading = None
        decoding = job.handoff.result() if job.handoff is not None else None
        job.handoff = None
        if decoding is not None:             # a host codec: its worker started on the read
            job.record, job.future = record, decoding
            return
        inner = self.fetch(record, job.kind, keep_compressed)
        job.record, job.weights, job.payload = record, inner.weights, inner.payload
        job.ready, job.future = inner.ready, inner.future

    def fetch(self, record: ExpertRecord, kind: str, keep_compressed: bool) -> FetchJob:
        """Start moving `record` to the device; returns at once on CUDA."""
        job = FetchJob(record.key, kind, record)
        if not record.device_decodable:
            job.future = self.pool.submit(self._host_decode_and_send, record, kind)
            return job
        buf, copied = self._copy(record.host, Job(kind, record.key, record.stored_nbytes))
        codecs = record.codecs
        if keep_compressed and codecs != ("raw",):
            job.payload, job.ready = buf, copied
        else:
            job.weights, job.ready = self.decode(record, buf, Job(kind, record.key), copied)
        return job

    def decode(self, record: ExpertRecord, buf: torch.Tensor, item: Job, after=None
               ) -> tuple[Weights, Any]:
        """Decode every payload of a record copied to the device (`buf`), after event `after`.

        A `raw` record needs no decoding: its tensors are views of the copy. One whose gate and
        up are stored apart is joined, which reads the copy: like a decode, after `after`.
        """
        if record.codecs == ("raw",) and not record.joins:
            return self._views(record, buf), after
        stream = self.decode_stream if self.decode_stream is not None else (
            torch.cuda.current_stream(self.device) if self.cuda else None)
        if not self.cuda:
            mark = self.tl.begin()
            out = self._views(record, buf)
            self.tl.end(mark, self.decode_track, item)
            return out, None
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            mark = self.tl.begin(stream)
            out = self._views(record, buf)
            self.tl.end(mark, self.decode_track, item, stream)
            buf.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return out, done

    def host_weights(self, record: ExpertRecord, item: Job) -> Weights:
        """Decode a record on the CPU in the calling thread (timed on `CPU decode`)."""
        t0 = self.tl.now()
        out = record.join({t.name: decode_payload(t.blob, None, torch.device("cpu"))
                           for t in record.tensors})
        self.tl.host("CPU decode", item, t0, self.tl.now())
        return out

    # -- internals ---------------------------------------------------------------------------
    def _views(self, record: ExpertRecord, buf: torch.Tensor) -> Weights:
        out = {}
        for t in record.tensors:
            payload = buf[t.payload_offset: t.payload_offset + t.blob.payload_nbytes]
            out[t.name] = decode_payload(t.blob, payload, buf.device)
        return record.join(out)

    def _copy(self, host: torch.Tensor, item: Job) -> tuple[torch.Tensor, Any]:
        """Host -> device copy of `host` (uint8) on the copy stream; (device tensor, done event)."""
        if not self.cuda:
            mark = self.tl.begin()
            dev = host.clone()                      # the "device" is the CPU: a memcpy
            self.tl.end(mark, "H2D link", item)
            return dev, None
        s = self.copy_stream
        with torch.cuda.stream(s):
            dev = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
            mark = self.tl.begin(s)
            dev.copy_(host, non_blocking=True)
            self.tl.end(mark, "H2D link", item, s)
            done = torch.cuda.Event()
            done.record(s)
        return dev, done

    def _host_decode_and_send(self, record: ExpertRecord, kind: str) -> tuple[Weights, Any]:
        """Worker thread: decode on the CPU, then send the decoded bytes (one copy per tensor)."""
        weights = self.host_weights(record, Job(kind, record.key))
        item = Job(kind, record.key, record.original_nbytes)
        if not self.cuda:
            mark = self.tl.begin()
            out = {n: t.clone() for n, t in weights.items()}
            self.tl.end(mark, "H2D link", item)
            return out, None
        s = self.copy_stream
        pinned = {n: t.pin_memory() for n, t in weights.items()}
        with torch.cuda.stream(s):
            mark = self.tl.begin(s)
            out = {n: t.to(self.device, non_blocking=True) for n, t in pinned.items()}
            self.tl.end(mark, "H2D link", item, s)
            done = torch.cuda.Event()
            done.record(s)
        return out, done
