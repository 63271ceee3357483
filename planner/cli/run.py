"""`moesz run`: serve a model with the real offloaded runtime and report measured throughput
(with `--predict`, beside the simulator's prediction of the same run: `sim.replay`)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from profiles.errors import ConfigError
from profiles.serving import ServingConfig, format_bytes, parse_mem

MODEL_HELP = "a packed-checkpoint directory (moesz pack), builtin, or a checkpoint directory"


def run(
    model: str = typer.Argument(..., help=MODEL_HELP),
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy or plan file."),
    uniform: Optional[str] = typer.Option(
        None, "--uniform", help="Every expert stored as CODEC[:MODE:LEVEL], e.g. szp:meanabs:0.5."),
    no_compression: bool = typer.Option(False, "--no-compression", help="Every expert raw."),
    gpu_mem: str = typer.Option("unlimited", "--gpu-mem", help="GPU budget: 24GiB or 25%."),
    host_mem: str = typer.Option("unlimited", "--host-mem", help="Host budget for stored experts."),
    cache: str = typer.Option("lru", "--cache", help="lru, lfu or static-hot."),
    prefetch: str = typer.Option("none", "--prefetch",
                                 help="none, next:ACC (router lookahead), oracle."),
    on_miss: str = typer.Option("fetch", "--on-miss",
                                help="fetch (to the device) or cpu (run there)."),
    resident: str = typer.Option("decompressed", "--resident",
                                 help="Cached experts kept decompressed or compressed."),
    gpu_decode: str = typer.Option("stream", "--gpu-decode",
                                   help="Decode on its own stream, or on the compute one."),
    layer_slots: Optional[str] = typer.Option(
        None, "--layer-slots", help="Per-layer cache: N experts per MoE layer, or N,N,…"),
    batch: int = typer.Option(1, "--batch", help="Sequences decoded together."),
    prompt: int = typer.Option(16, "--prompt", help="Prompt tokens per sequence (seeded random)."),
    tokens: int = typer.Option(128, "--tokens", help="Decode steps (tokens per sequence)."),
    unpinned: bool = typer.Option(False, "--pageable", help="Host buffers pageable, not pinned."),
    workers: int = typer.Option(8, "--workers", help="CPU decode worker threads."),
    disk_depth: Optional[int] = typer.Option(
        None, "--disk-depth", help="Disk tier: expert reads in flight (default 4, or the "
        "--predict profile's measured best depth)."),
    device: Optional[str] = typer.Option(None, "--device",
                                         help="cuda or cpu (default: cuda if present)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompt."),
    predict: Optional[str] = typer.Option(
        None, "--predict",
        help="Also simulate the same run on this hardware profile (FILE or preset:NAME)."),
    trace_out: Optional[str] = typer.Option(None, "--trace-out",
                                            help="Write the run's Chrome trace (Perfetto)."),
    placement_traces: Optional[str] = typer.Option(
        None, "--placement-traces", help="static-hot: pin the experts these routing traces "
        "activate most, instead of ranking by the run's own warm-up pass."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the checkpoint's own Python code."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Generate with the offloaded runtime; report measured tokens/s, time per output token, bytes
    moved and hit rate."""
    from pathlib import Path

    from planner.cli.pack import policy_from_options
    from profiles.fileio import atomic_write_json, check_output_file
    from profiles.runtime import measure_throughput
    from profiles.runtime.runner import resolve_device

    if trace_out:
        check_output_file(trace_out, "--trace-out")
    resolve_device(device)
    pol = policy_from_options(policy, uniform, no_compression)
    gb, hb = parse_mem(gpu_mem, what="--gpu-mem"), parse_mem(host_mem, what="--host-mem")
    slots = None
    if layer_slots:
        try:
            slots = tuple(int(v) for v in layer_slots.split(","))
        except ValueError:
            raise ConfigError(f"--layer-slots {layer_slots!r}: expected N or N,N,… "
                              f"integers") from None
    hw = None
    if predict:
        from profiles.hardware import load_hardware

        hw = load_hardware(predict)
        if disk_depth is None:
            disk_depth = hw.host.disk_depth if hw.host.disk_curve is not None else None
    serving = ServingConfig(cache_policy=cache, resident_form=resident, prefetch=prefetch,
                            on_miss=on_miss, batch_size=batch, prompt_tokens=prompt,
                            generated_tokens=tokens, pinned=not unpinned, gpu_decode=gpu_decode,
                            cpu_workers=workers, disk_depth=disk_depth).with_budgets(gb, hb)
    if slots is not None and len(slots) == 1:
        from profiles.packed import is_packed, read_packed
        from profiles.models import resolve_geometry

        g = read_packed(model, verify=False).geometry if is_packed(model) else \
            resolve_geometry(model)
        slots = slots * len(g.moe_layers)
    serving = replace(serving, per_layer_cache_slots=slots)
    _preflight(model, pol)
    if hw is not None:
        from sim.replay import check_same_machine

        check_same_machine(_DeviceOnly(str(resolve_device(device))), hw)
    with Progress(transient=True, disable=as_json or not Console().is_terminal) as bar:
        task = bar.add_task("running", total=tokens)
        result = measure_throughput(model, pol, serving, device=device, seed=seed,
                                    trust_remote_code=trust_remote_code,
                                    placement_traces=placement_traces,
                                    progress=lambda d, t, lab: bar.update(
                                        task, completed=d, total=t, description=lab))
    from sim.replay import predict_for_run, trace_document

    sim_run = predict_for_run(result, hw, record=bool(trace_out)) if hw is not None else None
    if trace_out:
        meta = {"model": result.model, "policy": result.policy, "device": result.device,
                "hardware_for_prediction": getattr(hw, "origin", None)}
        atomic_write_json(Path(trace_out), trace_document(result, sim_run, meta))
    if as_json:
        doc = result.to_dict()
        if sim_run is not None:
            doc["predicted"] = sim_run.result.to_dict()
            doc["predicted"]["hardware"] = hw.origin
            doc["relative_error"] = {k: e for k, (_, _, _, e) in _figures(result, sim_run.result)
                                     .items() if e is not None}
        typer.echo(json.dumps(doc, indent=2))
        return
    _print(result, sim_run, hw, trace_out)


def _preflight(model: str, policy) -> None:
    """Fail fast (before loading anything) on a policy that does not fit a packed checkpoint."""
    from profiles.packed import check_policy_matches, is_packed, read_packed

    if policy is not None and is_packed(model):
        check_policy_matches(read_packed(model, verify=False), policy)


class _DeviceOnly:
    """What `check_same_machine` reads of a run, before the run."""

    def __init__(self, device: str) -> None:
        self.device = device


def _figures(r, p) -> dict:
    """name -> (measured text, predicted text, ..., relative error) of the figures both have."""
    from sim.replay import relative_error

    def pair(name, m, q, fmt):
        return name, (fmt(m), "" if p is None else fmt(q), None,
                      None if p is None else relative_error(q, m))

    rows = [
        pair("tokens/s (decode)", r.tokens_per_s, p and p.tokens_per_s, lambda v: f"{v:.2f}"),
        pair("time per output token", r.tpot_s, p and p.tpot_s, lambda v: f"{v * 1e3:.2f} ms"),
        pair("time to first token", r.ttft_s, p and p.ttft_s, lambda v: f"{v:.3f} s"),
        pair("bytes moved host->device", r.bytes_h2d, p and p.bytes_h2d, format_bytes),
        pair("  of which prefetch", r.bytes_h2d_prefetch, p and p.bytes_h2d_prefetch,
             format_bytes),
        pair("bytes read from disk", r.bytes_disk, p and p.bytes_ssd, format_bytes),
        pair("disk reads", r.disk_reads, p and p.ssd_reads, lambda v: f"{v}"),
        pair("hit rate (decode)", r.hit_rate, p and p.hit_rate, lambda v: f"{v:.3f}"),
        pair("misses (decode)", r.misses, p and p.misses, lambda v: f"{v}"),
        pair("experts run on the CPU", r.cpu_expert_runs, p and p.cpu_expert_runs,
             lambda v: f"{v}"),
        pair("link busy fraction", r.link_busy_fraction, p and p.link_busy_fraction,
             lambda v: f"{v:.3f}"),
        pair("disk busy fraction", r.disk_busy_fraction, p and p.disk_busy_fraction,
             lambda v: f"{v:.3f}"),
    ]
    return dict(rows)


def _print(r, sim_run, hw, trace_out) -> None:
    console = Console(width=120)
    console.print(f"{r.model} — {r.policy}; batch {r.batch_size}, prompt {r.prompt_tokens}, "
                  f"{r.steps} decode steps on {r.device}")
    t = Table()
    t.add_column("figure")
    t.add_column("measured", justify="right")
    p = sim_run.result if sim_run is not None else None
    if p is not None:
        t.add_column(f"predicted ({hw.origin})", justify="right")
        t.add_column("error", justify="right")
    for name, (a, b, _, err) in _figures(r, p).items():
        cells = [name, a]
        if p is not None:
            cells += [b, "" if err is None else f"{err:+.1%}"]
        t.add_row(*cells)
    acc = "n/a" if r.prefetch_accuracy is None else f"{r.prefetch_accuracy:.3f}"
    gbps = "n/a" if r.link_achieved_gbps is None else f"{r.link_achieved_gbps:.2f}"
    overlap = "n/a" if r.decode_overlap_fraction is None else f"{r.decode_overlap_fraction:.2f}"
    cap = "unlimited" if r.cache_capacity_bytes is None else format_bytes(r.cache_capacity_bytes)
    extra = [
        ("link GB/s achieved", gbps, p and f"{p.link_h2d_gbps:g} (fit)"),
        ("decode/transfer overlap", overlap, None),
        ("prefetch accuracy", acc, None),
        ("expert cache capacity", cap,
         p and ("unlimited" if p.cache_capacity_bytes is None
                else format_bytes(p.cache_capacity_bytes))),
        ("expert cache peak (tensors held)", format_bytes(r.resident_peak_bytes), None),
        ("host memory, packed experts", format_bytes(r.host_expert_bytes),
         p and format_bytes(p.host_mem_bytes)),
    ]
    for name, a, b in extra:
        t.add_row(*([name, a] + ([b or "", ""] if p is not None else [])))
    console.print(t)
    console.print("measured: wall clock of one run after an unmeasured warm-up pass; tokens/s = "
                  "decode steps x batch / decode time." + (
                      " predicted: discrete-event simulation of the same routing, sizes and "
                      "serving configuration on the profile's machine; error = (predicted - "
                      "measured) / measured." if p is not None else ""))
    for note in r.notes:
        console.print(f"  note: {note}")
    if p is not None:
        for label in p.labels:
            console.print(f"  predicted from: {label}")
    if trace_out:
        console.print(f"  wrote Chrome trace (Perfetto): {trace_out}")
