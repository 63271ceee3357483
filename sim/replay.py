"""Predicting a measured run: the simulator fed exactly what the real runtime saw.

`predict_for_run` takes a `profiles.runtime.RunResult` — the routing it recorded, the experts'
measured packed sizes, its serving configuration and measured prefetch accuracy — and simulates
that configuration, so that a prediction and a measurement can be compared field by field, the
way Vidur and LLMServingSim validate their simulators (REFERENCE section 6). Used by `moesz run
--predict`, `moesz validate --throughput` (`planner.throughput`) and `benchmarks/gpu_check.py`.
`trace_document` puts both timelines in one Chrome trace (Perfetto), one process each.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from profiles.serving import ServingConfig


class MeasuredSizes:
    """A ratio source (`sim.ratios` duck type) from a run's measured per-expert sizes."""

    def __init__(self, result) -> None:
        self.result = result
        self.label = "expert sizes measured on the runtime's packed records"

    def ratio(self, layer: int, spec: Any, geometry: Any) -> float:
        sizes = [s for (lay, _), (s, _, _) in self.result.expert_sizes.items() if lay == layer]
        return geometry.bytes_per_expert * len(sizes) / max(1, sum(sizes))


def check_same_machine(result, hardware) -> None:
    """Refuse to compare a run with a profile of another kind of device: a CPU run beside an H200
    prediction is two machines in one table, not a fidelity check.

    Raises:
        ConfigError: the profile has no device section, or describes another device type.
    """
    from profiles.errors import ConfigError

    name = hardware.origin or hardware.name
    dev = hardware.gpu
    if dev is None:
        raise ConfigError(f"hardware profile {name} has no device section (measured by an older "
                          f"moesz on a machine without a GPU); measure this machine again with "
                          f"`moesz profile hardware --out hw.json`")
    ran = str(result.device).split(":")[0]
    if ran != dev.device_type:
        what = "a GPU" if dev.device_type == "cuda" else "the CPU as the device"
        raise ConfigError(f"the run used {ran} but {name} describes {what} ({dev.name}): a "
                          f"prediction for another machine is not a check of this run; predict "
                          f"with a profile measured here (`moesz profile hardware --out hw.json`), "
                          f"or use `moesz simulate --hardware {name}` for that machine")


def relative_error(predicted, measured) -> float | None:
    """(predicted - measured) / measured, or None where it is undefined."""
    if predicted is None or measured is None or not measured:
        return None
    return (float(predicted) - float(measured)) / float(measured)


def predict_for_run(result, hardware, *, record: bool = False):
    """Simulate the configuration a `RunResult` measured.

    Args:
        result: a `profiles.runtime.RunResult` (its routing, sizes, geometry and policy are used).
        hardware: a `HardwareProfile` (measured on the machine the run used, for a fidelity check).
        record: keep the simulated timeline (for a side-by-side Perfetto trace).

    Returns:
        A `sim.api.SimRun` (`.result` is the predicted `SimResult`).
    """
    from sim.api import make_workload, simulate
    from sim.costs import build_costs
    from sim.engine import SimOptions

    g = result.geometry
    serving = ServingConfig.from_dict(result.config)
    serving = replace(serving, batch_size=result.batch_size, prompt_tokens=result.prompt_tokens,
                      generated_tokens=result.steps)
    if serving.prefetch_mode[0] == "next":
        serving = replace(serving, prefetch=f"next:{result.prefetch_accuracy or 0.0:.6f}")
    wl = make_workload(g, serving, traces=result.routing_frame(),
                       source="routing recorded by moesz run")
    if result.placement_traces:  # static-hot ranked as the run ranked it
        from sim.api import load_traces
        from sim.workload import with_placement

        wl = with_placement(wl, load_traces(result.placement_traces),
                            source=result.placement_traces)
    costs = build_costs(g, result.storage_policy, hardware, serving, MeasuredSizes(result))
    L, E = len(g.moe_layers), g.experts_per_layer
    arrays = [np.zeros((L, E), dtype=np.int64) for _ in range(3)]
    for (layer, e), sizes in result.expert_sizes.items():
        for a, v in zip(arrays, sizes):
            a[g.moe_layers.index(layer), e] = v
    costs = replace(costs, stored_bytes=arrays[0], link_bytes=arrays[1], resident_bytes=arrays[2])
    return simulate(geometry=g, hardware=hardware, serving=serving, costs=costs, workload=wl,
                    options=SimOptions(record=record))


def trace_document(result, sim_run=None, meta: dict | None = None) -> dict:
    """A Chrome trace (Perfetto) of the measured run; with `sim_run`, the prediction alongside as
    a second process, in the simulator's exporter format."""
    from sim.timeline import chrome_trace, spans_of

    doc = chrome_trace(result.spans, meta)
    _rename(doc["traceEvents"], 1, f"moesz runtime (measured on {result.device})")
    if sim_run is not None:
        other = chrome_trace(spans_of(sim_run.simulation))["traceEvents"]
        for ev in other:
            ev["pid"] = 2
        _rename(other, 2, "moesz simulation (predicted)")
        doc["traceEvents"] += other
    return doc


def _rename(events: list, pid: int, name: str) -> None:
    for ev in events:
        if ev.get("ph") == "M" and ev.get("name") == "process_name" and ev["pid"] == pid:
            ev["args"]["name"] = name
