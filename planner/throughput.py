"""`moesz validate --throughput`: the simulator's prediction against the real runtime's measurement
on one configuration (issue 8, "Fidelity").

The runtime (`profiles.runtime.measure_throughput`) serves the model under the policy and serving
configuration and records what it did: routing, per-expert sizes, misses, bytes moved and wall-clock
timings. The simulator is then fed exactly that — the recorded routing as its trace, the measured
sizes, the same budget, cache and prefetch (`sim.replay.predict_for_run`) — on a hardware
profile, and the two are compared field by field, as Vidur and LLMServingSim validate (REFERENCE
section 6).

Which comparisons mean something depends on where the runtime ran:

- bytes moved, misses and hit rate follow from the routing, the cache policy and the sizes alone, so
  they are compared on any device (a CPU run checks the simulator's cache and byte accounting);
- tokens/s and time per output token are timings of a device: they are compared only when the
  runtime ran on a CUDA GPU and the hardware profile was measured (not a published preset). On a
  machine without a GPU the report says so instead of printing a meaningless error figure.
"""

from __future__ import annotations

from typing import Any, Callable

from profiles.serving import ServingConfig

Progress = Callable[[int, int, str], None]
TARGET, GOAL = 0.15, 0.10  # issue 8: within 15 %, goal 10 % (recorded, not asserted)
COUNT_FIELDS = ("bytes_h2d", "transfers", "misses", "hit_rate")
TIME_FIELDS = ("tokens_per_s", "tpot_s", "ttft_s")


def _err(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / meas


def check_throughput(model: Any, policy: Any, serving: ServingConfig, hardware: str, *,
                     device: str | None = None, seed: int = 0, trace_out: str | None = None,
                     progress: Progress | None = None) -> dict:
    """Run the runtime and the simulator on the same configuration and compare them.

    Args:
        model: a packed directory, a model spec (`builtin`, a checkpoint, `arch:...`) or a
            `LoadedModel`.
        policy: the storage `Policy` (None: the packed one, or no compression).
        serving: budgets, cache, prefetch, batch, prompt and generated tokens.
        hardware: the hardware profile the simulator uses (FILE or `preset:NAME`); for a fidelity
            figure, one measured on this machine (`moesz profile hardware`).
        device: `cuda` or `cpu` (default: cuda when present).
        seed: seeds the runtime's synthetic prompt.
        trace_out: write a Chrome trace with the measured and predicted timelines side by side.
        progress: `progress(done, total, label)`.

    Returns:
        A document (kind `throughput_check`): `measured` (runtime), `predicted` (simulator),
        per-field relative errors, `comparable` flags and notes.
    """
    from sim.replay import predict_for_run, trace_document
    from profiles.fileio import atomic_write_json
    from profiles.hardware import load_hardware
    from profiles.runtime import measure_throughput

    hw = load_hardware(hardware)
    run = measure_throughput(model, policy, serving, device=device, seed=seed, progress=progress)
    sim = predict_for_run(run, hw, record=bool(trace_out))
    if trace_out:
        atomic_write_json(trace_out, trace_document(run, sim, {
            "model": run.model, "policy": run.policy, "device": run.device,
            "hardware_for_prediction": hw.origin}))
    m, p = run.to_dict(), sim.result.to_dict()
    on_gpu = run.device.startswith("cuda")
    measured_hw = hw.source.kind == "measured" and hw.gpu is not None
    timed = on_gpu and measured_hw
    notes = []
    if not on_gpu:
        notes.append(f"the runtime ran on {run.device}: its tokens/s and time per token are CPU "
                     f"figures, while the prediction is for {hw.origin} ({hw.name}); the GPU "
                     f"throughput comparison needs a CUDA GPU (benchmarks/gpu_check.py). Bytes "
                     f"moved, misses and hit rate do not depend on the device and are compared.")
    elif not measured_hw:
        notes.append(f"{hw.origin} is not measured on this machine ({hw.source.kind}); measure it "
                     f"with `moesz profile hardware --out hw.json` and pass --hardware hw.json "
                     f"for a fidelity figure")
    rows = []
    for field in COUNT_FIELDS + TIME_FIELDS:
        comparable = field in COUNT_FIELDS or timed
        err = _err(p.get(field), m.get(field)) if comparable else None
        rows.append({"field": field, "measured": m.get(field), "predicted": p.get(field),
                     "relative_error": err, "comparable": comparable,
                     "within_target": (abs(err) <= TARGET) if comparable and err is not None
                     else None})
    return {"kind": "throughput_check", "schema_version": 1,
            "model": run.model, "policy": run.policy, "device": run.device,
            "hardware": {"spec": hw.origin, "name": hw.name, "source": hw.source.kind},
            "serving": serving.to_dict(), "comparison": rows,
            "target": {"relative_error": TARGET, "goal": GOAL,
                       "note": "recorded, not a pass/fail test (issue 8)"},
            "measured": {**m, "source": "measured (moesz runtime, wall clock)"},
            "predicted": {**p, "source": f"predicted (moesz simulator on {hw.origin})"},
            "notes": notes + list(m.get("notes", []))}
