"""lm-evaluation-harness tasks as paired, per-document accuracy metrics (`--lm-eval`).

EleutherAI's lm-evaluation-harness (L. Gao et al., "A framework for few-shot language model
evaluation", 2021-; lm-eval 0.4.13, `pip install moesz[lmeval]`) scores a model document by
document. A task is given as

- the path of a task YAML file (an lm-eval custom task, e.g. `dataset_path: json` with
  `dataset_kwargs: {data_files: {test: items.jsonl}}`; a relative data file is looked up beside the
  YAML first, then where lm-eval looks, the working directory), or
- the name of a task lm-eval registers (a group expands to its tasks) whose dataset is already in
  the local Hugging Face datasets cache.

Nothing reaches the network: tasks are loaded and run with the Hugging Face hub in offline mode, so
a task whose data are not local fails with one line naming the task and the fix.

Each document of the task's evaluation split falls in the `profile` or `validate` half by
`profiles.evaluation.textmetrics.split_of` of its JSON (keys sorted, UTF-8); the first `limit`
documents of a half, in the task's order, are scored. The model (a transformers model and its
Hugging Face tokenizer, wrapped in lm-eval's `HFLM`) answers each document as lm-eval prompts it;
the per-document value of the task's primary metric (`acc` for multiple_choice and loglikelihood,
`exact_match` for generate_until, else the task's first metric; the task's first filter) must be
right (1) or wrong (0), so a perturbed model is paired with the unperturbed one document by
document (`profiles.evaluation.paired`), exactly like a benchmark's prompts. A task's strict and
content accuracy are both that metric. Few-shot examples are drawn for each document by a generator
seeded with the document (the same prompt on every call), and from a pool without the other half's
documents and the document itself when the task draws them from its evaluation split.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import io
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from profiles.errors import ConfigError, MoeszError

PRIMARY_METRIC = {"multiple_choice": "acc", "loglikelihood": "acc",
                  "generate_until": "exact_match"}
FEWSHOT_SEED = 1234          # lm-eval's default fewshot_random_seed
SPLIT_METHOD = ("blake2b (8 bytes) of the document's JSON (keys sorted, UTF-8): last byte even -> "
                "profile, odd -> validate")
_FIX = ("give a task YAML whose dataset_kwargs.data_files are local files, or the questions as "
        "--bench FILE.jsonl")


@dataclass
class _Loaded:
    """The lm-eval task object and the half of each of its documents (not part of a task's
    identity: two loads of one task compare equal)."""

    task: object
    halves: list[str]
    docs: list


@dataclass(frozen=True)
class LmEvalTask:
    """One lm-eval task, loaded, and which half of its documents to score.

    Attributes:
        source: as given: a registered task or group name, or the YAML file's absolute path.
        name: lm-eval's task name (the task's name in results and budgets).
        output_type: multiple_choice, loglikelihood or generate_until.
        metric: the per-document metric scored (right = 1, wrong = 0).
        num_fewshot: few-shot examples in each prompt (lm-eval's choice, seeded).
        docs: documents in the task's evaluation split, both halves.
        docs_sha256: sha256 of the documents' JSON, in order (what a profile must be rerun with).
        prompts_sha256: sha256 of how the task renders each document (description, prompt text,
            target, choices, delimiters): a task re-templated over the same documents differs.
        split: `profile` or `validate`; None scores every document.
    """

    source: str
    name: str
    output_type: str
    metric: str
    num_fewshot: int
    docs: int
    docs_sha256: str
    prompts_sha256: str = ""
    split: str | None = None
    loaded: _Loaded | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        """What a profile records to load the same task again."""
        return {"source": self.source, "name": self.name, "output_type": self.output_type,
                "metric": self.metric, "num_fewshot": self.num_fewshot, "docs": self.docs,
                "docs_sha256": self.docs_sha256, "prompts_sha256": self.prompts_sha256}

    def indices(self, limit: int | None = None) -> list[int]:
        """Document indices of this task's half (all without a split), the first `limit`.

        Raises:
            MoeszError: the half has no document.
        """
        halves = self.loaded.halves
        idx = [i for i, h in enumerate(halves) if self.split is None or h == self.split]
        if not idx:
            raise MoeszError(f"--lm-eval {self.name}: none of its {len(halves)} documents falls in "
                             f"the {self.split} half (split by a hash of the document); give a "
                             f"task with more documents")
        return idx if limit is None else idx[:limit]

    def answer(self, model, tokenizer, limit: int | None, start: int = 0,
               stop: int | None = None, batch_size: int = 64
               ) -> tuple[list[str], list[str], list[bool]]:
        """Score documents [start, stop) of the first `limit` of this half with `model` as it is.

        Returns:
            (prompts as lm-eval built them, the model's answers, right or wrong), in document
            order.

        Raises:
            MoeszError: the tokenizer is not a Hugging Face one, lm-eval cannot run the task, or
                the metric is not right/wrong.
        """
        from lm_eval.evaluator import evaluate

        idx = self.indices(limit)[start:stop]
        if not idx:
            return [], [], []
        check_tokenizer(tokenizer, self.name)
        with _quiet_offline(), _fewshot_per_document(self):
            lm = _hflm(model, tokenizer, batch_size)
            try:   # a task YAML lm-eval loads but cannot run (e.g. a metric's wrong aggregation)
                out = evaluate(lm=lm, task_dict={"tasks": {self.name: self.loaded.task},
                                                 "groups": {}},
                               samples={self.name: list(idx)}, bootstrap_iters=0,
                               log_samples=True)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
                raise MoeszError(f"--lm-eval {self.name}: lm-eval cannot score its documents "
                                 f"({type(exc).__name__}: {_one_line(exc)}); check the task's "
                                 f"metric_list, doc_to_target and doc_to_choice") from None
        rows = out["samples"][self.name]
        first = rows[0]["filter"] if rows else None
        rows = sorted((r for r in rows if r["filter"] == first), key=lambda r: r["doc_id"])
        if [r["doc_id"] for r in rows] != list(idx):
            raise MoeszError(f"--lm-eval {self.name}: lm-eval returned documents "
                             f"{[r['doc_id'] for r in rows][:5]}..., not the ones asked for")
        prompts, shown, right = [], [], []
        for r in rows:
            value = r.get(self.metric)
            if value not in (0, 1):     # True/False and 0.0/1.0 included
                raise MoeszError(f"--lm-eval {self.name}: its metric {self.metric!r} is "
                                 f"{value!r} on document {r['doc_id']}, not right (1) or wrong "
                                 f"(0); paired tests need a right/wrong metric (acc, "
                                 f"exact_match)")
            prompts.append(str(r["arguments"][0][0]))
            shown.append(_shown(self.loaded.task, self.output_type, r))
            right.append(bool(value))
        return prompts, shown, right


def check_tokenizer(tokenizer, what: str) -> None:
    """Refuse the built-in model's character tokenizer (lm-eval needs a Hugging Face one).

    Raises:
        MoeszError: no tokenizer, or the built-in `CharTokenizer`.
    """
    from profiles.tasks.tokenizer import CharTokenizer

    if tokenizer is None or isinstance(tokenizer, CharTokenizer):
        raise MoeszError(f"--lm-eval {what}: lm-evaluation-harness needs a model with a Hugging "
                         f"Face tokenizer; the built-in model's character tokenizer cannot run "
                         f"its tasks (use the built-in tasks, or --bench FILE.jsonl)")


def parse_tasks(value: str | Sequence[str] | None) -> list[str]:
    """`TASK[,TASK]` (or a list of them) as a list, blanks dropped."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [x for v in value
                                                             for x in str(v).split(",")]
    return [v.strip() for v in items if v.strip()]


def load_tasks(value: str | Sequence[str], split: str | None = None) -> tuple[LmEvalTask, ...]:
    """Load the tasks of `--lm-eval TASK[,TASK]` with their data, offline.

    Args:
        value: task YAML paths and registered task names, comma-separated.
        split: `profile`, `validate`, or None (every document).

    Raises:
        ConfigError: lm-eval not installed, a YAML that cannot be read, an unknown name, data that
            are not local, an output type without a right/wrong metric, a task given twice.
    """
    specs = parse_tasks(value)
    if not specs:
        raise ConfigError("--lm-eval is empty; give TASK[,TASK]: task YAML files or registered "
                          "task names")
    _require(",".join(specs))
    out: list[LmEvalTask] = []
    for spec in specs:
        if _is_path(spec):
            tasks, source = _load_yaml(spec), str(Path(spec).expanduser().resolve())
        else:
            tasks, source = _load_name(_registry(), spec), spec
        out += [_describe(source, spec, t, split) for t in tasks]
    seen = set()
    for t in out:
        if t.name in seen:
            raise ConfigError(f"--lm-eval {value}: task {t.name!r} is given twice; give each "
                              f"once")
        seen.add(t.name)
    return tuple(out)


def from_records(records: Sequence[dict], split: str | None = None) -> tuple[LmEvalTask, ...]:
    """The tasks a profile recorded (`LmEvalTask.to_dict`), loaded again.

    Raises:
        ConfigError: as `load_tasks`, or a task whose documents, output type, metric or number of
            few-shot examples changed since it was recorded.
    """
    sources: dict[str, list[dict]] = {}
    for r in records:
        sources.setdefault(str(r["source"]), []).append(r)
    by_name = {t.name: t for t in load_tasks(list(sources), split)}
    out = []
    for r in records:
        t = by_name.get(r["name"])
        if t is None:
            raise ConfigError(f"--lm-eval {r['source']}: it no longer has task {r['name']!r}; "
                              f"profile again")
        if t.docs_sha256 != r.get("docs_sha256", t.docs_sha256):
            raise ConfigError(f"--lm-eval {r['name']}: its documents changed since the profile "
                              f"was made ({t.docs} now, {r.get('docs')} then); profile again")
        if r.get("prompts_sha256") and t.prompts_sha256 != r["prompts_sha256"]:
            raise ConfigError(f"--lm-eval {r['name']}: its prompts changed since the profile was "
                              f"made (the same documents rendered otherwise: description, "
                              f"template, target or choices); profile again")
        now = {k: getattr(t, k) for k in ("output_type", "metric", "num_fewshot")}
        then = {k: r.get(k, v) for k, v in now.items()}
        if now != then:
            diff = ", ".join(f"{k} {now[k]} now, {then[k]} then" for k in now
                             if now[k] != then[k])
            raise ConfigError(f"--lm-eval {r['name']}: it is scored otherwise than when the "
                              f"profile was made ({diff}); profile again")
        out.append(t)
    return tuple(out)


def _require(what: str) -> None:
    import importlib

    try:   # HFLM needs lm-eval's `hf` extra (accelerate) besides lm_eval itself
        importlib.import_module("lm_eval.models.huggingface")
    except ImportError:
        raise ConfigError(f"--lm-eval {what}: lm-evaluation-harness is not installed here; "
                          f"`pip install moesz[lmeval]` (lm-eval[hf]==0.4.13), or give the same "
                          f"questions as --bench FILE.jsonl") from None


def _is_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or Path(spec).is_file()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _load_yaml(spec: str) -> list:
    """The task of a YAML file, relative data files resolved beside it."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"--lm-eval {spec}: no such task YAML file; give an lm-eval task YAML "
                          f"(task, dataset_path, output_type, doc_to_text, ...) or a registered "
                          f"task name")
    try:
        cfg = load_yaml(path.resolve())
    except Exception as exc:   # yaml's, lm-eval's and importers' errors alike
        raise ConfigError(f"--lm-eval {spec}: not a readable lm-eval task YAML ({_one_line(exc)})"
                          f"; expected a mapping with task, dataset_path, output_type, "
                          f"doc_to_text, doc_to_target") from None
    if not isinstance(cfg.get("task"), str) or "group" in cfg or "task_list" in cfg:
        raise ConfigError(f"--lm-eval {spec}: expected one task (a 'task: NAME' mapping), not "
                          f"a group or tag; give one YAML per task")
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
        kwargs["data_files"] = _beside(kwargs["data_files"], path.resolve().parent)
    with _quiet_offline():
        try:
            loaded = TaskManager(include_defaults=False).load([cfg])
        except Exception as exc:
            raise ConfigError(f"--lm-eval {spec}: task {cfg['task']!r} cannot be loaded offline "
                              f"({_one_line(exc)}); {_FIX}") from None
    return list(loaded["tasks"].values())


def _beside(files, base: Path):
    """Data file paths relative to the YAML's directory when the file is there."""
    if isinstance(files, dict):
        return {k: _beside(v, base) for k, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_beside(v, base) for v in files]
    p = Path(str(files)).expanduser()
    return str(base / p) if not p.is_absolute() and (base / p).exists() else files


@functools.lru_cache(maxsize=1)
def _registry():
    """lm-eval's index of its registered tasks (built once per process: it reads thousands of
    YAML files, seconds)."""
    from lm_eval.tasks import TaskManager

    with _quiet_offline():
        return TaskManager()


def _load_name(manager, spec: str) -> list:
    if spec not in manager.all_tasks:
        close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"--lm-eval {spec}: lm-eval has no task, group or tag of that name"
                          f"{hint} and no such YAML file; give a registered name (`lm-eval ls "
                          f"tasks`) or a task YAML path")
    with _quiet_offline():
        try:
            loaded = manager.load([spec])
        except Exception as exc:
            raise ConfigError(f"--lm-eval {spec}: its data are not local ({_one_line(exc)}); "
                              f"moesz runs lm-eval offline: put the dataset in the local Hugging "
                              f"Face cache first, or {_FIX}") from None
    return list(loaded["tasks"].values())


def _describe(source: str, spec: str, task, split: str | None) -> LmEvalTask:
    """Check a loaded task and hash its documents."""
    from profiles.evaluation.textmetrics import split_of

    name, kind = task.task_name, task.OUTPUT_TYPE
    if kind not in PRIMARY_METRIC:
        raise ConfigError(f"--lm-eval {spec}: task {name!r} has output type {kind!r}, which has "
                          f"no right/wrong answer per document; give multiple_choice, "
                          f"loglikelihood or generate_until tasks")
    metrics = list(task.aggregation())
    metric = PRIMARY_METRIC[kind] if PRIMARY_METRIC[kind] in metrics or not metrics else metrics[0]
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    docs = list(task.eval_docs)
    if not docs:
        raise ConfigError(f"--lm-eval {spec}: task {name!r} has no documents in its evaluation "
                          f"split; {_FIX}")
    texts = [_doc_json(d) for d in docs]
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    if split is not None:
        from profiles.evaluation.textmetrics import check_split

        check_split(split, "--lm-eval split")
    return LmEvalTask(source, name, kind, metric, int(task.get_config("num_fewshot") or 0),
                      len(docs), digest, _prompts_sha256(task, docs, spec), split,
                      _Loaded(task, [split_of(t) for t in texts], docs))


def _prompts_sha256(task, docs, spec: str) -> str:
    """sha256 of the task's rendering of every document, in order."""
    h = hashlib.sha256()
    for key in ("description", "target_delimiter", "fewshot_delimiter"):
        h.update(repr(task.get_config(key)).encode("utf-8"))
    try:
        for d in docs:
            parts = [task.doc_to_text(d), task.doc_to_target(d)]
            if task.OUTPUT_TYPE == "multiple_choice":
                parts.append(task.doc_to_choice(d))
            h.update(repr(parts).encode("utf-8"))
    except Exception as exc:   # a template error of the user's task, not moesz's
        raise ConfigError(f"--lm-eval {spec}: task {task.task_name!r} cannot render its "
                          f"documents ({_one_line(exc)}); fix the task's templates") from None
    return h.hexdigest()


def _shown(task, kind: str, row: dict) -> str:
    """The model's answer as text: the chosen choice, or the generated (filtered) text."""
    resps = row["filtered_resps"]
    if kind == "multiple_choice" and resps:
        lls = [r[0] if isinstance(r, (tuple, list)) else float(r) for r in resps]
        best = max(range(len(lls)), key=lls.__getitem__)
        try:
            choices = task.doc_to_choice(row["doc"])
            return str(choices[best])
        except Exception:
            return f"choice {best}"
    return str(resps[0]) if resps else ""


@contextlib.contextmanager
def _fewshot_per_document(task: LmEvalTask):
    """Each document's few-shot examples drawn by a generator seeded with the document itself,
    from a pool without the other half's documents nor the document itself, for the duration.

    lm-eval's sampler is one generator advanced document after document, so a second call (the
    perturbed model after the baseline, or documents scored in two stages) would prompt the same
    document with other examples and break the pairing; and a task without a training or
    validation split draws its examples from the evaluation split, i.e. from the other half too,
    and (lm-eval excludes the document only when `fewshot_split` names the test split) the
    document itself, its answer shown.

    Raises:
        MoeszError: the pool has no more than `num_fewshot` documents besides the one prompted.
    """
    lt = task.loaded.task
    sampler = getattr(lt, "sampler", None)
    if task.num_fewshot <= 0 or sampler is None:
        yield
        return
    saved = (sampler.df, sampler._loaded, sampler.rnd)
    pool = list(sampler.fewshot_docs())
    evaluated = {_doc_json(d): h for d, h in zip(task.loaded.docs, task.loaded.halves)}
    keys = [_doc_json(d) for d in pool]
    from_eval = any(k in evaluated for k in keys)
    if task.split is not None:
        pool = [d for d, k in zip(pool, keys) if evaluated.get(k, task.split) == task.split]
    if from_eval and len(pool) <= task.num_fewshot:
        where = f"the {task.split} half" if task.split else "it"
        raise MoeszError(f"--lm-eval {task.name}: its few-shot examples come from its "
                         f"evaluation documents and {where} has {len(pool)}, not more than "
                         f"num_fewshot={task.num_fewshot}; give the task a fewshot_split or more "
                         f"documents")
    original, original_sample = lt.fewshot_context, sampler.sample
    current = [None]

    def fewshot_context(doc, *args, **kwargs):
        sampler.rnd = random.Random(f"{FEWSHOT_SEED}:{_doc_json(doc)}")
        current[0] = doc
        return original(doc, *args, **kwargs)

    def sample(n, eval_doc=None, df=None, **kwargs):   # lm-eval drops eval_doc from the draw
        return original_sample(n, eval_doc=current[0] if eval_doc is None else eval_doc, df=df,
                               **kwargs)

    sampler.df, sampler._loaded = pool, True
    lt.fewshot_context = fewshot_context
    if from_eval:
        sampler.sample = sample
    try:
        yield
    finally:
        del lt.fewshot_context
        if from_eval:
            del sampler.sample
        sampler.df, sampler._loaded, sampler.rnd = saved


def _doc_json(doc) -> str:
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str)


def _hflm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=max(1, int(batch_size)))


@contextlib.contextmanager
def _quiet_offline():
    """Hugging Face hub and datasets offline, lm-eval's logs and progress bars (tqdm, on stderr)
    kept off the terminal, for the duration."""
    import datasets
    import huggingface_hub.constants as hub

    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    flags = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
             datasets.config.HF_DATASETS_OFFLINE)
    log = logging.getLogger("lm_eval")
    level = log.level
    bars = datasets.utils.logging.is_progress_bar_enabled()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    log.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
         datasets.config.HF_DATASETS_OFFLINE) = flags
        log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


__all__ = ["LmEvalTask", "PRIMARY_METRIC", "SPLIT_METHOD", "check_tokenizer", "from_records",
           "load_tasks", "parse_tasks"]
