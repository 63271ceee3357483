"""`moesz model …`: what a model is made of (`info`, `presets`); `eval` and `trace` join this app.

MODEL is `builtin`, a local checkpoint directory, `preset:NAME[,key=value…]` or
`arch:NAME[,key=value…]`; weightless geometries are bf16 unless `dtype=` says otherwise.
"""

from __future__ import annotations

import json
import math
import re

import typer
from rich.console import Console
from rich.table import Table

from profiles.models import checkpoint_info, list_presets, resolve_geometry
from profiles.models.expert_map import format_ranges

app = typer.Typer(help="Inspect, evaluate and trace MoE models.", no_args_is_help=True)

MODEL_HELP = ("builtin, a local checkpoint directory, preset:NAME[,key=value…] or "
              "arch:NAME[,key=value…] (see `moesz model presets`)")


@app.command()
def info(
    model: str = typer.Argument(..., help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    no_fingerprint: bool = typer.Option(
        False, "--no-fingerprint",
        help="Skip the fingerprint (read from a sample of the weights in the files)."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the checkpoint's own Python code."),
) -> None:
    """The model's geometry: MoE layers, experts, top-k and bytes per expert."""
    weighted = not model.startswith(("preset:", "arch:")) and not no_fingerprint
    fingerprint, stored = None, None
    if weighted and _has_weights(model):
        ckpt = checkpoint_info(model, trust_remote_code=trust_remote_code)
        geometry, fingerprint = ckpt.geometry, ckpt.fingerprint
        stored = stored_tensors(ckpt.layout)
    else:
        if weighted:
            _refuse_pickles(model)
        geometry = resolve_geometry(model, trust_remote_code=trust_remote_code)
    source = _source(model, fingerprint is not None)
    if as_json:
        doc = {**geometry.to_dict(), "fingerprint": fingerprint, "source": source}
        if stored is not None:
            doc["expert_tensors_stored"] = stored
        typer.echo(_dumps(doc))
        return
    g = geometry
    table = Table(title=g.name, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("figures from", source)
    table.add_row("architecture", g.architecture)
    dense = [i for i in range(g.num_layers) if i not in g.moe_layers]
    table.add_row("decoder layers", f"{g.num_layers} (MoE {format_ranges(g.moe_layers)}"
                  + (f"; dense {format_ranges(dense)})" if dense else ")"))
    table.add_row("routed experts", f"{g.experts_per_layer} per MoE layer, top-{g.top_k}; "
                  f"{g.num_routed_experts} in all")
    table.add_row("hidden / expert FFN", f"{g.hidden_size} / {g.expert_intermediate_size}")
    table.add_row("expert tensors", ", ".join(f"{n} {'x'.join(map(str, s))}"
                                              for n, s in g.expert_tensor_shapes))
    table.add_row("storage dtype", g.dtype)
    if stored is not None:
        table.add_row("expert tensors as stored", ", ".join(
            f"{t['name']} {t['format']} {t['stored_bytes']:,} B" for t in stored))
    bf16 = 2 * sum(math.prod(s) for _, s in g.expert_tensor_shapes)
    table.add_row("bytes per expert", _bytes(g.bytes_per_expert) + (
        f"; {bf16:,} B in bf16" if g.dtype != "bf16" else ""))
    table.add_row("all routed experts", _bytes(g.routed_expert_bytes))
    table.add_row("shared experts (total)", _bytes(g.shared_expert_bytes))
    table.add_row("non-expert (total)", _bytes(g.non_expert_bytes))
    table.add_row("attention", f"{g.num_attention_heads} heads, {g.num_key_value_heads} KV heads, "
                  f"head dim {g.head_dim}; vocabulary {g.vocab_size}")
    table.add_row("fingerprint", fingerprint or "none (no weights)")
    Console(width=110).print(table)


@app.command()
def presets(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """Named geometries of real models, usable as preset:NAME."""
    items = list_presets()
    if as_json:
        typer.echo(json.dumps([{"name": p.name, "architecture": p.architecture,
                                "shipped_dtype": p.shipped_dtype, "source": p.source}
                               for p in items], indent=2))
        return
    table = Table("preset", "architecture", "experts shipped as", "source (published)")
    for p in items:
        table.add_row(p.name, p.architecture, p.shipped_dtype, p.source)
    Console(width=110).print(table)


def stored_tensors(layout) -> list[dict]:
    """Each routed-expert tensor of one expert as the files store it: format, stored bytes, and
    its bytes in bf16 beside (the same for every expert)."""
    from profiles.models.layout import storage_dtype

    first = layout.experts[(layout.moe_layers[0], 0)]
    return [{"name": t.name, "format": storage_dtype(t.dtype), "stored_bytes": t.stored_bytes,
             "bf16_bytes": 2 * t.numel} for t in first]


def _dumps(doc) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(doc, indent=2)
    return re.sub(r"\[[\d,\s.-]*\]", lambda m: re.sub(r"\s+", " ", m.group(0))
                  .replace("[ ", "[").replace(" ]", "]"), text)


def _has_weights(model: str) -> bool:
    from pathlib import Path

    from profiles.models.loading import builtin_dir

    path = builtin_dir() if model == "builtin" else Path(model).expanduser()
    return path.is_dir() and (any(path.glob("*.safetensors"))
                              or (path / "model.safetensors.index.json").is_file())


def _refuse_pickles(model: str) -> None:
    """A checkpoint with pickle weights only: refused (never unpickled) unless --no-fingerprint."""
    from pathlib import Path

    from profiles.models.files import _refuse_without_safetensors

    path = Path(model).expanduser()
    if path.is_dir() and any(p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")
                             for p in path.iterdir()):
        _refuse_without_safetensors(path)


def _source(model: str, weighted: bool) -> str:
    if model.startswith("preset:"):
        return "published config (preset); sizes computed from module shapes"
    if model.startswith("arch:"):
        return "transformers default config, sizes computed from module shapes"
    if weighted:
        return ("checkpoint: config.json and safetensors headers (nothing loaded); fingerprint "
                "from a sample of the weights")
    return "config.json, sizes computed from module shapes"


def _bytes(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,} B)"
    return f"{n:,} B"
