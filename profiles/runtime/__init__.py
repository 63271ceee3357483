"""The real offloaded runtime: serve a transformers MoE model whose routed experts wait, packed
and compressed, in host memory, under the same `ServingConfig` the simulator models.

    from profiles.runtime import measure_throughput
    result = measure_throughput("packed_dir", serving=ServingConfig(gpu_mem_fraction=0.25))

See docs/runtime.md for the user manual and docs/design.md ("Runtime API") for the contract.
"""

from profiles.runtime.engine import OffloadedRuntime
from profiles.runtime.surgery import OffloadedExperts
from profiles.runtime.generate import greedy_generate, synthetic_prompt
from profiles.runtime.results import RunResult
from profiles.runtime.runner import default_device, measure_throughput, open_model
from profiles.runtime.store import ExpertRecord, ExpertStore

__all__ = ["ExpertRecord", "ExpertStore", "OffloadedExperts", "OffloadedRuntime", "RunResult",
           "default_device", "greedy_generate", "measure_throughput", "open_model",
           "synthetic_prompt"]
