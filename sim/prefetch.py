"""Prefetchers: which experts of the next MoE layer to start copying once a layer's router has run.

- `none`: nothing.
- `next:ACC`: a next-layer predictor (as in MoE-Infinity / Pre-gated MoE) that names each expert
  the next layer will use with probability ACC and, otherwise, a wrong expert of that layer
  (which costs link time and cache space for nothing).
- `oracle`: the trace's actual next-layer experts (an upper bound for any predictor).
Prefetches never cross a token boundary: the next token's routing is unknown until it is sampled.
"""

from __future__ import annotations

import random

from profiles.serving import parse_prefetch
from sim.workload import Workload


class Prefetcher:
    name = "none"

    def predict(self, workload: Workload, step: int, layer_pos: int,
                rng: random.Random) -> tuple[int, ...]:
        """Experts of MoE layer position `layer_pos` at `step` to prefetch."""
        return ()


class NextLayerPrefetcher(Prefetcher):
    name = "next"

    def __init__(self, accuracy: float) -> None:
        self.accuracy = accuracy

    def predict(self, workload: Workload, step: int, layer_pos: int,
                rng: random.Random) -> tuple[int, ...]:
        true = workload.steps[step].layers[layer_pos][0]
        E = workload.experts_per_layer
        out, taken = [], set(true)
        for e in true:
            if rng.random() < self.accuracy:
                out.append(e)
            elif len(taken) < E:
                wrong = rng.randrange(E)
                while wrong in taken:
                    wrong = rng.randrange(E)
                taken.add(wrong)
                out.append(wrong)
        return tuple(out)


class OraclePrefetcher(Prefetcher):
    name = "oracle"

    def predict(self, workload: Workload, step: int, layer_pos: int,
                rng: random.Random) -> tuple[int, ...]:
        return workload.steps[step].layers[layer_pos][0]


PREFETCHERS = {"none": Prefetcher, "next": NextLayerPrefetcher, "oracle": OraclePrefetcher}


def make_prefetcher(text: str) -> Prefetcher:
    """Build from a serving config's `prefetch` string (`none`, `next:0.8`, `oracle`)."""
    mode, acc = parse_prefetch(text)
    if mode == "next":
        return NextLayerPrefetcher(acc)
    return PREFETCHERS[mode]()
