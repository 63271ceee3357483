"""`moesz validate`: a plan's accuracy measured for real on the held-out split (default), or, with
`--throughput`, the simulator's prediction against the real runtime on one configuration."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from profiles.errors import ConfigError
from profiles.serving import ServingConfig, parse_mem

_VERDICT_STYLE = {"held": "green", "violated": "red", "inconclusive": "yellow"}


def validate(
    plan: Optional[str] = typer.Argument(None, help="plan.json from `moesz plan`."),
    split: str = typer.Option("validate", "--split", help="Evaluation split (held out: validate)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Prompts per task (default: as "
                                        "many as the plan's profile used, else 300)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated built-in tasks."),
    model: Optional[str] = typer.Option(None, "--model", help="Model to use instead of the plan's "
                                        "(its fingerprint must match); with --throughput, the "
                                        "model to run."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Where the unperturbed "
                                            "model's result is cached (default ~/.cache/moesz)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Prompts per forward pass."),
    threads: int = typer.Option(1, "--threads", help="torch threads while evaluating (1 suits "
                                "small models and shared machines)."),
    throughput: bool = typer.Option(False, "--throughput", help="Compare the simulator with the "
                                    "real runtime instead of measuring accuracy."),
    policy: Optional[str] = typer.Option(None, "--policy", help="--throughput: policy file."),
    uniform: Optional[str] = typer.Option(None, "--uniform",
                                          help="--throughput: CODEC[:MODE:LEVEL] for every expert."),
    hardware: str = typer.Option("preset:h200-published", "--hardware", help="--throughput: "
                                 "hardware profile for the prediction (measure this machine's "
                                 "with `moesz profile hardware`)."),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="--throughput: GPU budget "
                                          "(default: the plan's, else 25%)."),
    host_mem: Optional[str] = typer.Option(None, "--host-mem", help="Host budget for stored "
                                           "experts: with --throughput the runtime's; otherwise "
                                           "the routed experts stay on disk and at most this "
                                           "much of them is held (models larger than RAM)."),
    cache: Optional[str] = typer.Option(None, "--cache", help="--throughput: lru, lfu, static-hot."),
    prefetch: Optional[str] = typer.Option(None, "--prefetch", help="--throughput: none, next:ACC, "
                                           "oracle."),
    on_miss: Optional[str] = typer.Option(None, "--on-miss", help="--throughput: fetch or cpu."),
    resident: Optional[str] = typer.Option(None, "--resident", help="--throughput: cached experts "
                                           "decompressed or compressed."),
    gpu_decode: Optional[str] = typer.Option(None, "--gpu-decode", help="--throughput: stream or "
                                             "compute."),
    pageable: bool = typer.Option(False, "--pageable", help="--throughput: pageable host buffers."),
    batch: Optional[int] = typer.Option(None, "--batch", help="--throughput: sequences."),
    prompt: int = typer.Option(16, "--prompt", help="--throughput: prompt tokens."),
    tokens: int = typer.Option(64, "--tokens", help="--throughput: decode steps."),
    device: Optional[str] = typer.Option(None, "--device", help="--throughput: cuda or cpu."),
    trace_out: Optional[str] = typer.Option(None, "--trace-out", help="--throughput: Chrome trace "
                                            "with the measured and predicted timelines."),
    hardware_here: Optional[str] = typer.Option(
        None, "--hardware-here", help="--throughput without a GPU: this machine's profile "
        "(`moesz profile hardware --model MODEL`); default: measured and calibrated now."),
    text: Optional[str] = typer.Option(None, "--text", help="Measure KL, top-1 agreement and "
                                       "perplexity ratio on this file's validate half instead of "
                                       "the plan's text."),
    bench: Optional[list[str]] = typer.Option(None, "--bench", help="JSONL benchmark to measure "
                                              "(its validate half) instead of the plan's "
                                              "(repeatable)."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks "
                                          "TASK[,TASK] (task YAML files or registered names with "
                                          "local data) to measure (their validate halves) "
                                          "instead of the plan's."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure a plan's accuracy on the held-out split and judge it against its budget."""
    from planner.cli.model_eval import _progress_bar
    from profiles.fileio import check_output_dir, check_output_file

    if cache_dir:
        check_output_dir(cache_dir, "--cache-dir")
    if trace_out:
        check_output_file(trace_out, "--trace-out")
    if throughput:
        _throughput(plan, model, policy, uniform, hardware, gpu_mem, host_mem, cache, prefetch,
                    on_miss, resident, gpu_decode, pageable, batch, prompt, tokens, device,
                    trace_out, as_json, hardware_here)
        return
    if plan is None:
        raise ConfigError("give a plan file: moesz validate plan.json (or --throughput with "
                          "--model and --policy/--uniform)")
    if policy or uniform:
        raise ConfigError("--policy/--uniform apply to --throughput; accuracy validation uses the "
                          "plan's own policy")
    from planner.cli.model_eval import host_bytes
    from planner.validate import read_plan, validate_plan

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    with _progress_bar("validate", not as_json) as progress:
        doc = validate_plan(plan, split=split, limit=limit, tasks=names, model=model,
                            cache_dir=cache_dir, batch_size=batch_size, threads=threads,
                            progress=progress, host_mem=host_bytes(
                                model or read_plan(plan).model_spec, host_mem)
                            if host_mem else None, text=text, bench=tuple(bench or ()),
                            lm_eval=lm_eval)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    print_validation(doc, Console(width=120))


def print_validation(doc: dict, console: Console) -> None:
    """The validation as a table: per task, measured (with intervals) and the plan's prediction."""
    from planner.report_sections import iv_sig, iv_text

    m, p = doc["measured"], doc["predicted"]
    t = Table(title=f"{doc['plan']} on {doc['model']['spec']}, split {doc['split']}, "
                    f"{doc['limit']} prompts per task (measured, real codec round trips; "
                    f"base → plan, paired change, exact McNemar p)",
              title_justify="left")
    for col in ("task", "strict %", "Δ strict, pts [95 %]", "p", "content %",
                "Δ content, pts [95 %]", "p"):
        t.add_column(col, justify="left" if col == "task" else "right")
    for task, r in m["tasks"].items():
        t.add_row(task, _pair(r, "strict"), iv_text(r["strict_change"], unit=""),
                  f"{r['strict_mcnemar_p']:.2g}", _pair(r, "content"),
                  iv_text(r["content_change"], unit=""), f"{r['content_mcnemar_p']:.2g}")
    console.print(t)
    metric = doc["metric"]
    unit = {"kl": (1.0, " nats", 4), "ppl": (1.0, "", 4)}.get(metric, (100.0, " pts", 2))
    what = {"kl": "mean KL(base || plan), nats per token",
            "ppl": "perplexity ratio - 1",
            "content": "content drop, mean over tasks",
            "strict": "strict drop, mean over tasks"}.get(metric, f"{metric} content drop")
    fmt = (lambda d: iv_sig(d, unit[1])) if metric in ("kl", "ppl") else \
        (lambda d: iv_text(d, *unit))
    pred = fmt(p["accuracy_drop"]) if p.get("accuracy_drop") else "not in the plan"
    console.print(f"{what}: measured {fmt(m['accuracy_drop'])}"
                  f" ({m['interval_method']}); predicted by the plan {pred}")
    if m.get("text"):
        x = m["text"]
        console.print(f"text ({x['corpus']}; measured): KL {iv_sig(x['kl_nats'], ' nats')}"
                      f", top-1 agreement {iv_text(x['top1_agreement'], 100.0, ' %', 2)}, "
                      f"perplexity ratio {iv_sig(x['ppl_ratio'], '', 6)}", highlight=False)
    if m.get("mcnemar_p") is not None:
        console.print(f"exact McNemar p (discordant prompts pooled over tasks): {m['mcnemar_p']:.3g}")
    if m.get("ratio"):
        host = p.get("host_mem_bytes")
        console.print(f"stored expert bytes: measured {m['stored_bytes']:,} (ratio {m['ratio']:.2f}x"
                      f")" + (f"; predicted {host:,.0f}" if isinstance(host, (int, float)) else ""))
    if "experts_from_disk" in doc:
        d = doc["experts_from_disk"]
        console.print(f"experts served from disk (measured): {d['expert_reads']:,} reads, "
                      f"{d['read_bytes']:,} bytes, host peak {d['host_peak_bytes']:,} of "
                      f"{d['host_budget_bytes']:,} bytes; arithmetic in {doc['compute']}",
                      highlight=False)
    v = doc["verdict"]
    console.print(f"verdict: [bold {_VERDICT_STYLE[v]}]{v}[/] — {doc['verdict_detail']['reason']}")


def _pair(r: dict, metric: str) -> str:
    return f"{r['base'][metric]['value'] * 100:.1f} → {r['plan'][metric]['value'] * 100:.1f}"


def _throughput(plan, model, policy, uniform, hardware, gpu_mem, host_mem, cache, prefetch,
                on_miss, resident, gpu_decode, pageable, batch, prompt, tokens, device, trace_out,
                as_json, hardware_here=None) -> None:
    from planner.cli.model_eval import _progress_bar
    from planner.cli.pack import policy_from_options
    from planner.throughput import check_throughput
    from profiles.runtime.runner import resolve_device

    resolve_device(device)
    serving, spec = ServingConfig(), model
    if plan is not None:
        if policy or uniform:
            raise ConfigError("give a plan, or --policy/--uniform, not both")
        from planner.validate import read_plan

        facts = read_plan(plan, model)
        pol, spec = facts.policy, facts.model_spec
        if isinstance(facts.doc.get("serving"), dict):
            serving = ServingConfig.from_dict(facts.doc["serving"])
    else:
        if model is None:
            raise ConfigError("--throughput needs a plan file, or --model with --policy/--uniform")
        pol = policy_from_options(policy, uniform, False)
    over = {k: v for k, v in (("cache_policy", cache), ("prefetch", prefetch),
                              ("on_miss", on_miss), ("resident_form", resident),
                              ("gpu_decode", gpu_decode), ("batch_size", batch)) if v is not None}
    if pageable:
        over["pinned"] = False
    serving = ServingConfig.from_dict({**serving.to_dict(), **over, "prompt_tokens": prompt,
                                       "generated_tokens": tokens})
    if gpu_mem is not None or serving.gpu_budget.unlimited:
        serving = serving.with_budgets(parse_mem(gpu_mem or "25%", what="--gpu-mem"), None)
    if host_mem is not None:
        serving = serving.with_budgets(None, parse_mem(host_mem, what="--host-mem"))
    with _progress_bar("runtime", not as_json) as progress:
        doc = check_throughput(spec, pol, serving, hardware, device=device, trace_out=trace_out,
                               progress=progress)
    if doc["device"] == "cpu":
        import tempfile

        from planner.throughput import this_machine
        from profiles.hardware import load_hardware

        gpu_hw = hardware if (load_hardware(hardware).gpu is not None
                              and not load_hardware(hardware).gpu.serial) \
            else "preset:h200-published"
        with tempfile.TemporaryDirectory(prefix="moesz-validate-") as tmp, \
                _progress_bar("this machine", not as_json) as progress:
            doc["this_machine"] = this_machine(spec, pol, tmp, preset=gpu_hw,
                                               hardware_here=hardware_here, tokens=tokens,
                                               prompt=prompt, progress=progress)
    if as_json:
        typer.echo(json.dumps(doc, indent=2, default=str))
        return
    console = Console(width=120)
    t = Table(title=f"{doc['model']} — {doc['policy']} on {doc['device']}", title_justify="left")
    for col in ("figure", "measured (runtime)", f"predicted ({doc['hardware']['spec']})",
                "error"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for r in doc["comparison"]:
        err = ("not comparable" if not r["comparable"] else "n/a" if r["relative_error"] is None
               else f"{r['relative_error'] * 100:+.1f} %")
        t.add_row(r["field"], _fmt(r["measured"]), _fmt(r["predicted"]), err)
    console.print(t)
    for note in doc["notes"]:
        console.print(f"note: {note}")
    if doc.get("this_machine"):
        from planner.throughput import this_machine_lines

        for line in this_machine_lines(doc["this_machine"]):
            console.print(line)
    if trace_out:
        console.print(f"wrote {trace_out} (open in https://ui.perfetto.dev)")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)

