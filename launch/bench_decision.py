"""The allocation decision alone, at scale: every method's pure decision on 1,000 modules x 64 slots of random
scores, on one process (it runs on rank 0 only, between one all-reduce and one broadcast).

    python launch/bench_decision.py --modules 1000 --slots 64 --repeat 5

Prints the median seconds per decision and the size of the broadcast plan. Nothing is asserted: it is for reading.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    import torch

    from ds_dynrank.allocation import Plan, alora_plan, l1ra_plan, top_budget_plan
    from ds_dynrank.methods.modalloc import strategies

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", type=int, default=1000)
    p.add_argument("--slots", type=int, default=64, help="capacity per module; half are live")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    M, R = args.modules, args.slots
    live = [list(range(R // 2)) for _ in range(M)]
    scores = [torch.rand(R, generator=gen) for _ in range(M)]
    gates = [s * (s > 0.2) for s in scores]  # about a fifth of the gates at zero
    caps, costs = [R] * M, [1] * M
    cases = {
        "l1ra": lambda: l1ra_plan(gates, live, threshold=1e-3, floor=1, cap_M=caps, cost_M=costs),
        "alora": lambda: alora_plan(scores, live, n_prune=M, floor=1, cap_M=caps, cost_M=costs),
        "adalora": lambda: top_budget_plan(scores, live, budget=M * R // 3, floor=1),
        "modalloc (discounted)": lambda: strategies.discounted(
            torch.rand(M, generator=gen), torch.ones(M), 2 * M // 3, torch.Generator().manual_seed(1)
        ),
    }
    print(f"{'decision':<24} {'median s':>10} {'broadcast int64 entries':>24}")
    for name, decide in cases.items():
        times, plan = [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            plan = decide()
            times.append(time.perf_counter() - start)
        size = Plan.wire_size([R] * M)  # every plan is broadcast as keep mask [S] + grow [M] + active [M]
        assert plan is not None
        print(f"{name:<24} {statistics.median(times):>10.4f} {size:>24,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
