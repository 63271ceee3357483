"""Entry points: build a workload, run a simulation, sweep memory budgets.

```python
from sim import simulate_policy, make_workload
wl = make_workload(geometry, serving, synthetic=parse_synthetic("zipf:1.1"))
run = simulate_policy(geometry=g, hardware=hw, serving=serving, policy=policy, workload=wl,
                      ratios=SyntheticRatios())
run.result.tokens_per_s
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pandas as pd

from profiles.errors import ConfigError
from profiles.hardware import HardwareProfile
from profiles.serving import MemBudget, ServingConfig
from sim.costs import ExpertCosts, build_costs
from sim.engine import SimOptions, Simulation
from sim.results import SimResult
from sim.shape import check_geometry
from sim.synthetic import SyntheticSpec, synthetic_traces
from sim.timing import TimeModel
from sim.workload import Workload, build_workload

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SimRun:
    result: SimResult
    simulation: Simulation  # for timeline export (spans when run with record=True)


def load_traces(path: str | os.PathLike) -> pd.DataFrame:
    """Read a routing-trace parquet file (`profiles.traces.read_traces`)."""
    from profiles.traces import read_traces

    return read_traces(path)


def make_workload(geometry: Any, serving: ServingConfig, *, traces: pd.DataFrame | None = None,
                  synthetic: SyntheticSpec | None = None, source: str = "traces") -> Workload:
    """A workload from recorded traces, or from a synthetic spec (one prompt per batch slot)."""
    check_geometry(geometry)
    if (traces is None) == (synthetic is None):
        raise ConfigError("give either recorded traces or a synthetic spec (--traces or --synthetic)")
    if synthetic is not None:
        traces = synthetic_traces(tuple(geometry.moe_layers), geometry.experts_per_layer,
                                  geometry.top_k, prompts=serving.batch_size,
                                  prompt_tokens=serving.prompt_tokens,
                                  decode_tokens=serving.generated_tokens, spec=synthetic)
        source = synthetic.describe()
    return build_workload(traces, moe_layers=tuple(geometry.moe_layers),
                          experts_per_layer=geometry.experts_per_layer, top_k=geometry.top_k,
                          batch_size=serving.batch_size, prompt_tokens=serving.prompt_tokens,
                          generated_tokens=serving.generated_tokens, source=source)


def simulate(*, geometry: Any, hardware: HardwareProfile, serving: ServingConfig,
             costs: ExpertCosts, workload: Workload, options: SimOptions = SimOptions(),
             times: TimeModel | None = None) -> SimRun:
    """Run one discrete-event simulation with explicit per-expert costs."""
    check_geometry(geometry)
    sim = Simulation(geometry=geometry, hardware=hardware, serving=serving, costs=costs,
                     workload=workload, times=times, options=options)
    return SimRun(sim.run(), sim)


def simulate_policy(*, geometry: Any, hardware: HardwareProfile, serving: ServingConfig,
                    policy: Any, workload: Workload, ratios: Any,
                    options: SimOptions = SimOptions()) -> SimRun:
    """Run one simulation with costs derived from a `Policy` and a ratio source."""
    costs = build_costs(geometry, policy, hardware, serving, ratios)
    return simulate(geometry=geometry, hardware=hardware, serving=serving, costs=costs,
                    workload=workload, options=options)


def sweep(*, geometry: Any, hardware: HardwareProfile, serving: ServingConfig,
          policies: Sequence[tuple[str, Any]], workload: Workload, ratios: Any,
          gpu_budgets: Sequence[MemBudget], host_budgets: Sequence[MemBudget] = (MemBudget(),),
          cache_policies: Sequence[str] | None = None, options: SimOptions = SimOptions(),
          progress: Progress | None = None) -> list[tuple[dict, SimResult]]:
    """Simulate every (policy, cache policy, GPU budget, host budget) combination.

    Args:
        policies: (label, Policy) pairs.
        gpu_budgets, host_budgets: budgets to sweep.
        cache_policies: cache policy names (default: the serving config's).
        progress: `progress(done, total, label)` after each run.

    Returns:
        (what was varied, result) per run, in sweep order.
    """
    caches = list(cache_policies or [serving.cache_policy])
    combos = [(p, c, gb, hb) for p in policies for c in caches for gb in gpu_budgets
              for hb in host_budgets]
    out = []
    costs_memo: dict[str, ExpertCosts] = {}
    times = TimeModel(hardware, geometry, serving.batch_size)
    for i, ((label, policy), cache, gb, hb) in enumerate(combos):
        sv = ServingConfig.from_dict({**serving.to_dict(), "cache_policy": cache}).with_budgets(gb, hb)
        if label not in costs_memo:
            costs_memo[label] = build_costs(geometry, policy, hardware, sv, ratios)
        run = simulate(geometry=geometry, hardware=hardware, serving=sv, costs=costs_memo[label],
                       workload=workload, options=options, times=times)
        out.append(({"policy": label, "cache": cache, "gpu_mem": str(gb), "host_mem": str(hb)},
                    run.result))
        if progress:
            progress(i + 1, len(combos), f"{label} {cache} gpu {gb}")
    return out
