"""Prediction: the discrete-event simulator of expert traffic and the closed-form cost model.

Imports `profiles` only; never `planner`. Entry points: `sim.api` (`make_workload`, `simulate`,
`simulate_policy`), `sim.closed_form.ClosedFormModel`, `sim.study.run_study` (what `moesz
simulate` runs), `sim.timeline` (Chrome trace, Gantt chart).
"""

from sim.api import SimRun, load_traces, make_workload, simulate, simulate_policy
from sim.closed_form import ClosedFormModel
from sim.engine import SimOptions
from sim.results import SimResult
from sim.synthetic import SyntheticSpec, parse_synthetic, synthetic_traces

__all__ = ["ClosedFormModel", "SimOptions", "SimResult", "SimRun", "SyntheticSpec", "load_traces",
           "make_workload", "parse_synthetic", "simulate", "simulate_policy", "synthetic_traces"]
