"""Evaluation: greedy generation, accuracy with intervals, paired statistics, fidelity and user
benchmarks (see `docs/evaluation.md`)."""

from profiles.evaluation.accuracy import Interval, proportion, wilson_interval
from profiles.evaluation.evaluate import (EvalResult, TaskResult, answer_budget, cached_baseline,
                                          evaluate, task_examples)
from profiles.evaluation.fidelity import (BaseDistributions, FidelityResult, PerplexityResult,
                                          base_distributions, builtin_calibration, fidelity,
                                          perplexity)
from profiles.evaluation.generate import Generation, greedy_generate
from profiles.evaluation.paired import (PairedComparison, compare_paired, holm_adjust,
                                        holm_verdicts, mcnemar_exact_p, newcombe_paired_interval)
from profiles.evaluation.userbench import UserBenchmark, run_lm_eval

__all__ = [
    "BaseDistributions", "EvalResult", "FidelityResult", "Generation", "Interval",
    "PairedComparison", "PerplexityResult", "TaskResult", "UserBenchmark", "answer_budget",
    "base_distributions", "builtin_calibration", "cached_baseline", "compare_paired", "evaluate",
    "fidelity", "greedy_generate", "holm_adjust", "holm_verdicts", "mcnemar_exact_p",
    "newcombe_paired_interval", "perplexity", "proportion", "run_lm_eval", "task_examples",
    "wilson_interval",
]
