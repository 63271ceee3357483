"""`moesz model eval` and `moesz model trace`: measured accuracy (with intervals, paired against the
unperturbed model when a policy is applied) and routing traces, each a thin call into
`profiles.evaluation` or `profiles.traces`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.cli.model import app
from profiles.errors import ConfigError

_out = Console(width=150)
SPLITS = ("profile", "validate")


@contextmanager
def _progress_bar(description: str, enabled: bool = True):
    """A transient rich progress bar on stderr, driven by `progress(done, total, label)`."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  TextColumn("{task.fields[label]}"), console=Console(stderr=True),
                  transient=True, disable=not enabled) as bar:
        task = bar.add_task(description, total=None, label="")
        yield lambda done, total, label: bar.update(task, completed=done, total=total,
                                                    label=label[:50])


def _policy(policy_file: Optional[Path], uniform: Optional[str]):
    from profiles.policy import Policy, StorageSpec

    if policy_file is not None and uniform is not None:
        raise ConfigError("give either --policy FILE or --uniform CODEC:MODE:LEVEL, not both")
    if policy_file is not None:
        return Policy.load(policy_file), str(policy_file)
    if uniform is not None:
        spec = StorageSpec.parse(uniform)
        return Policy(default=spec), f"uniform {spec.describe()}"
    return None, None


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} is invalid; choose {' or '.join(SPLITS)} (train is "
                          f"what the built-in model learned from)")
    return split


def _tasks(tasks: Optional[str]) -> list[str] | None:
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="builtin, a local checkpoint directory, or a packed "
                                "checkpoint (its experts served from disk)"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated built-in tasks "
                                        "(default: all, or none when --bench or --lm-eval is "
                                        "given)."),
    split: str = typer.Option("validate", "--split", help="profile or validate."),
    limit: int = typer.Option(100, "--limit", help="Prompts per task."),
    policy_file: Optional[Path] = typer.Option(None, "--policy", help="Policy or plan file to "
                                               "apply; the base model is evaluated too, paired."),
    uniform: Optional[str] = typer.Option(None, "--uniform", help="Apply one storage spec to every "
                                          "expert, e.g. szp:meanabs:0.5 or rtn8."),
    surrogate: Optional[str] = typer.Option(None, "--surrogate", help="gaussian or uniform noise "
                                            "instead of real codec round trips."),
    seed: int = typer.Option(0, "--seed", help="Seed of the surrogate noise (nothing else is "
                             "random: greedy decoding and real codecs are deterministic)."),
    bench: Optional[list[Path]] = typer.Option(None, "--bench", help="JSONL benchmark with "
                                               "question/answer lines (repeatable)."),
    template: Optional[str] = typer.Option(None, "--template", help="Prompt template for --bench, "
                                           "with {question}."),
    extract: Optional[str] = typer.Option(None, "--extract", help="Answer-extraction regex for "
                                          "--bench strict accuracy."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Generation budget for "
                                       "--bench items."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks "
                                          "TASK[,TASK]: task YAML files, or registered names "
                                          "whose data are in the local Hugging Face cache; the "
                                          "--split half of their documents, scored per document "
                                          "(paired with a policy)."),
    with_fidelity: bool = typer.Option(False, "--fidelity", help="Also measure mean KL(base||"
                                       "perturbed) and top-1 agreement on the calibration set."),
    text: Optional[Path] = typer.Option(None, "--text", help="Also measure perplexity on this "
                                        "local text file."),
    batch_size: int = typer.Option(64, "--batch-size", help="Prompts per forward pass."),
    threads: int = typer.Option(1, "--threads", help="Torch threads while evaluating (1 suits "
                                "small models and shared machines; run one process per core)."),
    alpha: float = typer.Option(0.05, "--alpha", help="Family-wise level of the Holm-corrected "
                                "verdicts over tasks."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the "
                                           "checkpoint's own Python code."),
    host_mem: Optional[str] = typer.Option(
        None, "--host-mem", help="Leave the routed experts on disk and keep at most this much of "
        "them in host memory (e.g. 8GiB, 25%): for models larger than RAM; packed checkpoints "
        "are always served from disk."),
) -> None:
    """Measured accuracy per task with 95 % intervals; with a policy, the paired change."""
    from profiles.evaluation import (UserBenchmark, base_distributions, builtin_calibration,
                                     evaluate, fidelity, perplexity)
    from profiles.evaluation.threads import torch_threads
    from profiles.evaluation.userbench import DEFAULT_EXTRACT, DEFAULT_TEMPLATE
    from profiles.models import load_model
    from profiles.policy import apply_policy

    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha {alpha:g} must be between 0 and 1 (a family-wise level such "
                          f"as 0.05)")
    split, names = _split(split), _tasks(tasks)
    policy, label = _policy(policy_file, uniform)
    if with_fidelity and policy is None:
        raise ConfigError("--fidelity compares against the base model; give --policy or --uniform")
    benches = [UserBenchmark(str(p), template=template or DEFAULT_TEMPLATE,
                             extract=extract or DEFAULT_EXTRACT, max_new_tokens=max_new_tokens)
               for p in bench or []]
    lm_evals = ()
    if lm_eval:
        from profiles.evaluation.lmeval import load_tasks

        lm_evals = load_tasks(lm_eval, split)
    loaded = load_model(model, trust_remote_code=trust_remote_code,
                        host_mem=host_bytes(model, host_mem, trust_remote_code),
                        offload=host_mem is not None)
    if lm_evals:
        from profiles.evaluation.lmeval import check_tokenizer

        check_tokenizer(loaded.tokenizer, lm_eval)
    kw = dict(tasks=names, split=split, limit=limit, batch_size=batch_size, benchmarks=benches,
              lm_evals=lm_evals)
    fid = ppl = report = None
    with _progress_bar("evaluate", not as_json) as progress, torch_threads(threads):
        base = evaluate(loaded, progress=progress, **kw)
        calib = base_dist = None
        if with_fidelity:
            calib = builtin_calibration(loaded.model, loaded.tokenizer)
            base_dist = base_distributions(loaded.model, calib)
        ppl_base = perplexity(loaded.model, loaded.tokenizer, text) if text else None
        result = base
        if policy is not None:
            with apply_policy(loaded, policy, surrogate=surrogate, seed=seed,
                              progress=progress) as report:
                result = evaluate(loaded, progress=progress, baseline=base, condition=label, **kw)
                fid = fidelity(loaded.model, base_dist) if with_fidelity else None
                ppl = perplexity(loaded.model, loaded.tokenizer, text) if text else None
    verdicts = result.verdicts(alpha) if policy is not None else {}
    doc = _eval_doc(result, base, policy is not None, verdicts, label, surrogate, seed, report,
                    fid, ppl_base, ppl)
    if lm_evals:
        from profiles.evaluation.lmeval import SPLIT_METHOD

        doc["lm_eval"] = [{**t.to_dict(), "split": split, "split_method": SPLIT_METHOD}
                          for t in lm_evals]
    if loaded.offload is not None:
        from profiles.models.offload import offload_summary

        doc["experts_from_disk"] = offload_summary(loaded)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    _print_eval(doc, alpha)


def _eval_doc(result, base, paired, verdicts, label, surrogate, seed, report, fid, ppl_base,
              ppl) -> dict:
    tasks = {}
    for t in result.tasks:
        row = {"n": t.n, "strict": t.strict.to_dict(), "content": t.content.to_dict()}
        if paired:
            b = base.task(t.task)
            verdict, p_holm = verdicts[t.task]
            row.update(base_strict=b.strict.to_dict(), base_content=b.content.to_dict(),
                       content_change=t.content_change.change.to_dict(),
                       strict_change=t.strict_change.change.to_dict(),
                       mcnemar_p=t.content_change.mcnemar_p,
                       strict_mcnemar_p=t.strict_change.mcnemar_p,
                       discordant={"gained": t.content_change.gained,
                                   "lost": t.content_change.lost},
                       mcnemar_p_holm=p_holm, verdict=verdict)
        tasks[t.task] = row
    doc = {"model": result.model, "fingerprint": result.fingerprint, "split": result.split,
           "limit": result.limit, "decoding": "greedy (deterministic)", "source": "measured",
           "policy": label, "surrogate": surrogate, "tasks": tasks}
    if surrogate:
        doc["surrogate_seed"] = seed
    if report is not None:
        doc["policy_bytes"] = {"stored_bytes": report.stored_bytes,
                               "original_bytes": report.original_bytes, "ratio": report.ratio,
                               "source": "measured blob sizes"}
    if fid is not None:
        doc["fidelity"] = fid.to_dict()
    if ppl_base is not None:
        doc["perplexity_base"] = ppl_base.to_dict()
    if ppl is not None:
        doc["perplexity"] = ppl.to_dict()
    return doc


def host_bytes(model: str, host_mem: Optional[str], trust_remote_code: bool = False
               ) -> int | None:
    """--host-mem in bytes (a fraction is of the model's routed-expert bytes); None: unlimited."""
    if host_mem is None:
        return None
    from profiles.serving import parse_mem

    budget = parse_mem(host_mem, what="--host-mem")
    if budget.bytes is not None or budget.fraction is None:
        return budget.bytes
    from profiles.models import resolve_geometry
    from profiles.packed import is_packed, read_packed

    g = read_packed(model, verify=False).geometry if is_packed(model) else \
        resolve_geometry(model, trust_remote_code)
    return int(budget.fraction * g.routed_expert_bytes)


def _fmt(iv: dict, signed: bool = False) -> str:
    """An interval in percent (or percentage points): `87.5 [80.1, 92.4]`."""
    s = "+" if signed else ""
    return f"{iv['value'] * 100:{s}.1f} [{iv['low'] * 100:{s}.1f}, {iv['high'] * 100:{s}.1f}]"


def _print_eval(doc: dict, alpha: float) -> None:
    paired = doc["policy"] is not None
    from profiles.tasks import TASKS

    split = f", {doc['split']} split" if any(t in TASKS for t in doc["tasks"]) else ""
    title = (f"{doc['model']}{split}, greedy decoding — measured"
             + (f"; policy {doc['policy']}" + (f" ({doc['surrogate']} surrogate, seed "
                                                f"{doc['surrogate_seed']})" if doc['surrogate']
                                               else "") if paired else ""))
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    table.add_column("n", justify="right")
    if paired:
        table.add_column("base content %")
    table.add_column("strict %")
    table.add_column("content %")
    if paired:
        table.add_column("content change, pts")
        table.add_column("McNemar p", justify="right")
        table.add_column(f"verdict (Holm, α={alpha:g})")
    for name, row in doc["tasks"].items():
        cells = [name, str(row["n"])]
        if paired:
            cells.append(_fmt(row["base_content"]))
        cells += [_fmt(row["strict"]), _fmt(row["content"])]
        if paired:
            cells += [_fmt(row["content_change"], signed=True),
                      f"{row['mcnemar_p']:.3g}", row["verdict"]]
        table.add_row(*cells)
    _out.print(table)
    notes = ["accuracy: measured share of prompts correct, with its 95 % Wilson score interval "
             "[low, high]"]
    if paired:
        notes.append("change: perturbed minus base on the same prompts in percentage points, 95 % "
                     "Newcombe paired interval (method 10); p: exact McNemar, two-sided; "
                     "verdicts after Holm over the tasks")
    for t in doc.get("lm_eval", []):
        notes.append(f"{t['name']}: lm-eval {t['output_type']} task, {t['num_fewshot']}-shot, "
                     f"scored per document by its {t['metric']!r} (strict and content are both "
                     f"that), the {t['split']} half of its {t['docs']} documents")
    if "policy_bytes" in doc and doc["policy_bytes"]["ratio"]:
        pb = doc["policy_bytes"]
        notes.append(f"policy: {pb['stored_bytes']:,} of {pb['original_bytes']:,} expert bytes "
                     f"stored, ratio {pb['ratio']:.2f}x (measured blob sizes)")
    if "fidelity" in doc:
        f = doc["fidelity"]
        notes.append(f"fidelity (measured, {f['positions']} positions of {f['sequences']} "
                     f"sequences, {f['calibration']}): mean KL(base||perturbed) "
                     f"{f['mean_kl_nats']:.4g} nats, top-1 agreement {f['top1_agreement']:.1%}")
    for key, what in (("perplexity_base", "base"), ("perplexity", "perturbed")):
        if key in doc:
            p = doc[key]
            notes.append(f"perplexity of {what} model on {p['path']} (measured, {p['tokens']} "
                         f"tokens): {p['perplexity']:.3f}")
    if "experts_from_disk" in doc:
        d = doc["experts_from_disk"]
        budget = "unlimited" if d["host_budget_bytes"] is None else f"{d['host_budget_bytes']:,}"
        notes.append(f"experts served from disk (measured): {d['expert_reads']:,} expert reads, "
                     f"{d['read_bytes']:,} bytes read, {d['host_hits']:,} host hits; host "
                     f"budget {budget} bytes, peak held {d['host_peak_bytes']:,}; process peak "
                     f"resident memory {d['peak_rss_bytes']:,} bytes")
    for n in notes:
        _out.print(n, highlight=False, markup=False)


@app.command("trace")
def trace(
    model: str = typer.Argument(..., help="builtin or a local checkpoint directory"),
    out: Path = typer.Option(..., "--out", help="Parquet file to write."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated built-in tasks "
                                        "(default: all)."),
    split: str = typer.Option("profile", "--split", help="profile or validate."),
    limit: int = typer.Option(32, "--limit", help="Prompts per task."),
    batch_size: int = typer.Option(64, "--batch-size", help="Prompts per forward pass."),
    threads: int = typer.Option(1, "--threads", help="Torch threads while evaluating (1 suits "
                                "small models and shared machines; run one process per core)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the "
                                           "checkpoint's own Python code."),
) -> None:
    """Record which experts every prompt and generated token selects, as parquet."""
    from profiles.models import load_model
    from profiles.evaluation.threads import torch_threads
    from profiles.traces import record_traces, trace_stats, write_traces

    split, names = _split(split), _tasks(tasks)
    if out.suffix != ".parquet":
        raise ConfigError(f"--out {out}: expected a .parquet file name")
    from profiles.fileio import check_output_file

    check_output_file(out, "--out", (".parquet",))
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    with _progress_bar("trace", not as_json) as progress, torch_threads(threads):
        rec = record_traces(loaded, names, split, limit, batch_size=batch_size, progress=progress)
    write_traces(rec.frame, out)
    E = loaded.geometry.experts_per_layer
    stats = {p: trace_stats(rec.frame, E, None if p == "all" else p)
             for p in ("all", "prefill", "decode")}
    phases = rec.frame["phase"].value_counts().to_dict()
    if as_json:
        typer.echo(json.dumps({"out": str(out), "rows": len(rec.frame), "prompts": len(rec.prompts),
                               "rows_by_phase": {k: int(v) for k, v in phases.items()},
                               "source": "measured", **{k: v.to_dict() for k, v in stats.items()}},
                              indent=2))
        return
    _out.print(f"wrote {out}: {len(rec.frame):,} rows ({phases.get('prefill', 0):,} prefill, "
               f"{phases.get('decode', 0):,} decode) from {len(rec.prompts)} prompts "
               f"({split} split), one per token x MoE layer x rank", highlight=False)
    s = stats["decode"]
    table = Table(title=f"decode routing per MoE layer (measured, {s.tokens} generated tokens)",
                  title_justify="left")
    for col in ("layer", "entropy / max", "Gini", "reuse gap (tokens, mean)",
                "LRU stack distance (mean)", "most used expert (share)"):
        table.add_column(col, justify="right")
    for ls in s.layers:
        total = sum(ls.activations) or 1
        top = max(range(E), key=lambda e: ls.activations[e])
        table.add_row(str(ls.layer), f"{ls.entropy_ratio:.3f}", f"{ls.gini:.3f}",
                      f"{ls.reuse_gap_mean_tokens:.2f}", f"{ls.stack_distance_mean:.2f}",
                      f"{top} ({ls.activations[top] / total:.1%})")
    _out.print(table)
