"""`moesz pack`: write a model's routed experts compressed as a policy says (packed checkpoint)."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from profiles.errors import ConfigError
from profiles.serving import format_bytes

MODEL_HELP = "builtin or a local checkpoint directory (safetensors, read expert by expert)"


def policy_from_options(policy: Optional[str], uniform: Optional[str], no_compression: bool,
                        required: bool = False):
    """The Policy named by --policy / --uniform / --no-compression (None when none is given)."""
    from profiles.policy import Policy, StorageSpec

    given = [x for x in (policy, uniform, no_compression or None) if x]
    if len(given) > 1:
        raise ConfigError("give one of --policy, --uniform and --no-compression")
    if policy:
        return Policy.load(policy)
    if uniform:
        return Policy(default=StorageSpec.parse(uniform))
    if no_compression:
        return Policy.none()
    if required:
        raise ConfigError("give --policy plan.json (or --uniform CODEC:MODE:LEVEL, "
                          "--no-compression)")
    return None


def pack(
    model: str = typer.Argument(..., help=MODEL_HELP),
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy or plan file."),
    uniform: Optional[str] = typer.Option(
        None, "--uniform", help="Every expert stored as CODEC[:MODE:LEVEL], e.g. szp:meanabs:0.5."),
    no_compression: bool = typer.Option(False, "--no-compression", help="Every expert raw."),
    out: str = typer.Option(..., "--out", help="Directory to write the packed checkpoint to."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the checkpoint's own Python code."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Pack MODEL's routed experts as the policy says: one blob per expert tensor, a manifest with
    checksums, and the non-expert weights as safetensors. Streams from the checkpoint's files (one
    expert in memory at a time); an interrupted pack resumes when rerun."""
    import torch
    from rich.progress import (BarColumn, DownloadColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    from profiles.models.source import FileExperts
    from profiles.packed import pack as pack_model
    from profiles.packed.write import pack_rate, peak_rss_bytes

    pol = policy_from_options(policy, uniform, no_compression, required=True)
    src = FileExperts.open(model, trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    with Progress(*columns, transient=True,
                  disable=as_json or not Console(stderr=True).is_terminal,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("packing experts", total=src.geometry.routed_expert_bytes)
        ckpt = pack_model(src, pol, out, progress=lambda d, t, lab: bar.update(
            task, completed=d, total=t, description=f"packing {lab}"))
    seconds = time.perf_counter() - t0
    totals = ckpt.manifest["totals"]
    peak = peak_rss_bytes()
    doc = {"out": str(ckpt.path), "model": src.spec, "fingerprint": ckpt.fingerprint,
           "experts": totals["experts"], "stored_expert_bytes": totals["stored_expert_bytes"],
           "original_expert_bytes": totals["original_expert_bytes"], "ratio": totals["ratio"],
           "checkpoint_expert_bytes": totals.get("checkpoint_expert_bytes"),
           "ratio_vs_checkpoint": totals.get("ratio_vs_checkpoint"),
           "host_bytes": ckpt.host_bytes, "files": len(ckpt.manifest["files"]) + 1,
           "pack_s": seconds, "mb_per_s": pack_rate(totals["original_expert_bytes"], seconds),
           "peak_rss_bytes": peak, "torch_threads": torch.get_num_threads()}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    t = Table(title=f"packed {src.spec} -> {ckpt.path}", show_header=False,
              title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    t.add_row("fingerprint", ckpt.fingerprint)
    t.add_row("routed experts", f"{totals['experts']}")
    shipped = src.geometry.dtype
    t.add_row("expert bytes, original" if shipped not in ("mxfp4", "fp8_e4m3") else
              f"expert bytes, decoded ({str(src.dtype).replace('torch.', '')})",
              format_bytes(totals["original_expert_bytes"]))
    if shipped in ("mxfp4", "fp8_e4m3"):  # the checkpoint ships its experts quantized
        t.add_row(f"expert bytes, as shipped ({shipped})",
                  format_bytes(totals["checkpoint_expert_bytes"]))
    t.add_row("expert bytes, packed", f"{format_bytes(totals['stored_expert_bytes'])} (measured; "
                                      f"ratio {totals['ratio']:.2f}x vs original, headers included"
                                      + (f"; {totals['ratio_vs_checkpoint']:.2f}x vs the shipped "
                                         f"{shipped}" if shipped in ("mxfp4", "fp8_e4m3") else "")
                                      + ")")
    t.add_row("host memory (sum of files)", f"{format_bytes(ckpt.host_bytes)} "
                                            f"({ckpt.host_bytes} bytes, measured)")
    t.add_row("time", f"{seconds:.1f} s (measured; this run only, resumed layers not counted)")
    t.add_row("throughput", f"{doc['mb_per_s']:.1f} MB/s of {src.geometry.dtype} expert bytes "
                            f"(measured, {doc['torch_threads']} torch threads)")
    t.add_row("peak memory", f"{format_bytes(peak)} resident (measured; the checkpoint is "
                             f"{format_bytes(src.geometry.total_bytes)})")
    Console(width=110).print(t)
