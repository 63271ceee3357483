"""`moesz simulate`: predict throughput and latency of an offloaded MoE model (discrete-event
simulation, with the closed-form prediction alongside)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from profiles.errors import ConfigError
from profiles.hardware import load_hardware
from profiles.serving import ServingConfig, format_bytes, parse_mem

MODEL_HELP = ("a model profile directory (profile.json), builtin, a checkpoint directory, "
              "preset:NAME or arch:NAME[,key=value…]")


def simulate(
    hardware: str = typer.Option(..., "--hardware", help="Hardware profile: FILE or preset:NAME."),
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy or plan file."),
    uniform: Optional[str] = typer.Option(
        None, "--uniform", help="Every expert stored as CODEC[:MODE:LEVEL], e.g. szp:meanabs:0.5."),
    no_compression: bool = typer.Option(False, "--no-compression",
                                        help="Every expert raw (the default)."),
    gpu_mem: str = typer.Option(..., "--gpu-mem",
                                help="GPU budget(s), comma-separated: 24GiB,40GiB or 25%,50%."),
    host_mem: str = typer.Option("unlimited", "--host-mem",
                                 help="Host budget(s) for stored experts: 512GiB or 25%."),
    ssd_gbps: Optional[float] = typer.Option(None, "--ssd-gbps", help="Override SSD read GB/s."),
    ssd_latency_s: Optional[float] = typer.Option(None, "--ssd-latency-s",
                                                  help="Override SSD read latency (s)."),
    cache: str = typer.Option("lru", "--cache", help="lru, lfu, static-hot (comma list sweeps)."),
    prefetch: str = typer.Option("none", "--prefetch", help="none, next:ACC (e.g. next:0.8), oracle."),
    on_miss: str = typer.Option("fetch", "--on-miss", help="fetch (to the GPU) or cpu (run there)."),
    resident: str = typer.Option("decompressed", "--resident",
                                 help="Cached experts kept decompressed or compressed."),
    gpu_decode: str = typer.Option("stream", "--gpu-decode",
                                   help="GPU decompression on its own stream, or on the compute one."),
    layer_slots: Optional[str] = typer.Option(
        None, "--layer-slots", help="Per-layer cache: N experts per MoE layer, or N,N,… per layer."),
    batch: int = typer.Option(1, "--batch", help="Sequences decoded together."),
    disk_depth: Optional[int] = typer.Option(
        None, "--disk-depth", help="Disk reads in flight (default: the profile's measured best "
        "depth). A profile with only a line fit, measured one read at a time, reads one at a "
        "time."),
    workers: int = typer.Option(8, "--workers", help="CPU decode worker threads."),
    traces: Optional[str] = typer.Option(None, "--traces", help="Routing traces (parquet)."),
    placement_traces: Optional[str] = typer.Option(
        None, "--placement-traces", help="Rank static placements (static-hot, hot-first host "
        "placement) by these traces instead of the replayed ones, e.g. another split's."),
    synthetic: Optional[str] = typer.Option(
        None, "--synthetic", help="Synthetic traces zipf:S[,locality:P][,seed:N]."),
    prompt: int = typer.Option(128, "--prompt", help="Prompt tokens per sequence."),
    tokens: int = typer.Option(256, "--tokens", help="Generated tokens per sequence."),
    unpinned: bool = typer.Option(False, "--pageable", help="Host buffers pageable, not pinned."),
    seed: int = typer.Option(0, "--seed", help="Seed for synthetic traces and prefetch errors."),
    trace_out: Optional[str] = typer.Option(None, "--trace-out",
                                            help="Write the first run's Chrome trace (Perfetto)."),
    gantt: Optional[str] = typer.Option(None, "--gantt",
                                        help="Write a Gantt chart (PNG) of the first run."),
    plot: Optional[str] = typer.Option(
        None, "--plot", help="Budget-sweep plot file (default simulate-sweep.png for a sweep)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of runs."),
) -> None:
    """Predict tokens/s, latency, link use and hit rate under GPU (and host) memory budgets."""
    from profiles.policy import Policy, StorageSpec
    from sim.engine import SimOptions
    from sim.plots import plot_budget_sweep
    from sim.study import load_model_source, run_study
    from sim.synthetic import parse_synthetic
    from sim.timeline import plot_gantt, spans_of, write_chrome_trace

    from profiles.fileio import check_output_file
    from sim.plots import PLOT_SUFFIXES

    if trace_out:
        check_output_file(trace_out, "--trace-out")
    for option, path in (("--gantt", gantt), ("--plot", plot)):
        if path:
            check_output_file(path, option, PLOT_SUFFIXES)
    if sum(x is not None and x is not False for x in (policy, uniform, no_compression or None)) > 1:
        raise ConfigError("give one of --policy, --uniform and --no-compression")
    if policy:
        pol, label = Policy.load(policy), f"policy {policy}"
    elif uniform:
        spec = StorageSpec.parse(uniform)
        pol, label = Policy(default=spec), spec.describe()
    else:
        pol, label = Policy.none(), "no compression"
    gpu_budgets = [parse_mem(x, what="--gpu-mem") for x in gpu_mem.split(",")]
    host_budgets = [parse_mem(x, what="--host-mem") for x in host_mem.split(",")]
    caches = [c.strip() for c in cache.split(",")]
    hw = load_hardware(hardware)
    source = load_model_source(model, seed)
    slots = None
    if layer_slots:
        try:
            vals = [int(v) for v in layer_slots.split(",")]
        except ValueError:
            raise ConfigError(f"--layer-slots {layer_slots!r}: expected N or N,N,… integers") from None
        n = len(source.geometry.moe_layers)
        slots = tuple(vals * n if len(vals) == 1 else vals)
    serving = ServingConfig(cache_policy=caches[0], per_layer_cache_slots=slots,
                            resident_form=resident, prefetch=prefetch, on_miss=on_miss,
                            batch_size=batch, prompt_tokens=prompt, generated_tokens=tokens,
                            pinned=not unpinned, gpu_decode=gpu_decode, disk_depth=disk_depth,
                            cpu_workers=workers)
    syn = parse_synthetic(synthetic) if synthetic else None
    if syn is not None and synthetic and "seed:" not in synthetic:
        syn = type(syn)(syn.zipf_s, syn.locality, seed)
    options = SimOptions(seed=seed, record=bool(trace_out or gantt), ssd_gbps=ssd_gbps,
                         ssd_latency_s=ssd_latency_s)
    total = len(caches) * len(gpu_budgets) * len(host_budgets)
    with Progress(transient=True, disable=as_json or total == 1) as bar:
        task = bar.add_task("simulating", total=total)
        study = run_study(hardware=hw, source=source, policy=pol, policy_label=label,
                          serving=serving, gpu_budgets=gpu_budgets, host_budgets=host_budgets,
                          caches=caches, traces_path=traces, synthetic=syn, options=options,
                          placement_traces_path=placement_traces,
                          progress=lambda d, t, lab: bar.update(task, completed=d, description=lab))
    sim0 = study.first_simulation
    meta = {"model": source.label, "hardware": hw.origin, "policy": label,
            "workload": study.workload_source}
    if trace_out:
        write_chrome_trace(trace_out, spans_of(sim0), meta)
    if gantt:
        spans = spans_of(sim0)
        dec = [m for m in sim0.step_marks if m[0] == "decode"]
        window = (dec[0][1], dec[0][2]) if dec else None
        plot_gantt(gantt, spans, window, title=f"{source.geometry.name}: {label} (predicted, "
                                                 f"first decode step)")
    sweep = len(gpu_budgets) > 1
    plot_path = plot or ("simulate-sweep.png" if sweep else None)
    if plot_path:
        plot_budget_sweep(plot_path, study.rows, f"{source.geometry.name} on {hw.origin}: {label}")
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in study.rows], indent=2))
        return
    _print(study, hw, source, label, trace_out, gantt, plot_path)


def _print(study, hw, source, label, trace_out, gantt, plot_path) -> None:
    console = Console(width=160)
    r0 = study.rows[0].result
    title = (f"{source.geometry.name} on {hw.origin} — {label}; batch {r0.config['batch_size']}, "
             f"prompt {r0.config['prompt_tokens']}, {r0.config['generated_tokens']} tokens; "
             f"traces: {study.workload_source}")
    host = any(row.varied["host_mem"] != "unlimited" for row in study.rows)
    t = Table(title=title, title_justify="left")
    cols = ["GPU budget"] + (["host budget", "SSD read"] if host else []) + [
        "cache", "tok/s sim", "tok/s CF", "TPOT ms", "TTFT s", "hit rate", "H2D moved",
        "link busy", "decode busy", "GPU used"]
    for col in cols:
        t.add_column(col, justify="left" if col == "cache" else "right", no_wrap=True)
    for row in study.rows:
        r = row.result
        budget = format_bytes(r.gpu_budget_bytes) if r.gpu_budget_bytes is not None else "unlimited"
        if row.varied["gpu_mem"].endswith("%"):
            budget = f"{budget} ({row.varied['gpu_mem']})"
        cf = f"{row.closed_form_tokens_per_s:.2f}" if row.closed_form_tokens_per_s else "n/a"
        cells = [budget] + ([row.varied["host_mem"], format_bytes(r.bytes_ssd)] if host else []) + [
            row.varied["cache"], f"{r.tokens_per_s:.2f}", cf, f"{r.tpot_s * 1e3:.2f}",
            f"{r.ttft_s:.3f}", f"{r.hit_rate:.3f}", format_bytes(r.bytes_h2d),
            f"{r.link_busy_fraction:.2f}", f"{r.decode_busy_fraction:.2f}",
            format_bytes(r.gpu_mem_bytes)]
        t.add_row(*cells)
    console.print(t)
    console.print("All figures are predicted: 'sim' by the discrete-event simulator, 'CF' by the "
                  "planner's closed-form cost model; throughput and hit rate are for the decode "
                  "phase.")
    for line in dict.fromkeys(lab for row in study.rows for lab in row.result.labels):
        console.print(f"  inputs: {line}")
    notes = dict.fromkeys(n for row in study.rows for n in row.result.notes + row.closed_form_notes)
    for line in notes:
        console.print(f"  note: {line}")
    for what, path in (("Chrome trace (Perfetto)", trace_out), ("Gantt chart", gantt),
                       ("budget sweep plot", plot_path)):
        if path:
            console.print(f"  wrote {what}: {path}")
