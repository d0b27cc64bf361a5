"""The workloads, in the order a full run takes them: one function ``Bench -> list[dict]`` each.

What each measures and its target: bench/README.md. ``pgbench`` (in bench/harness.py) is the
machine's raw commit rate, the yardstick for the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.harness import Bench, pgbench_baseline
from bench.workloads.drain import w1b_drain, w1c_capped, w1t_transactional, w2_ten_steps
from bench.workloads.history import w5_history
from bench.workloads.producer import w0_producer, w1_one_step
from bench.workloads.schedules import w6_schedules
from bench.workloads.timers import w4_timers, w4a_async_timers, w4b_many_sleepers
from bench.workloads.wake import w3_wake_latency, w3a_async_wake_latency

WORKLOADS: dict[str, Callable[[Bench], list[dict[str, Any]]]] = {
    "pgbench": pgbench_baseline,
    "W0": w0_producer,
    "W1": w1_one_step,
    "W5": w5_history,  # right after W1, whose per_sec it is compared with
    "W1b": w1b_drain,
    "W1c": w1c_capped,
    "W1t": w1t_transactional,
    "W2": w2_ten_steps,
    "W3": w3_wake_latency,
    "W3a": w3a_async_wake_latency,
    "W4": w4_timers,
    "W4a": w4a_async_timers,
    "W4b": w4b_many_sleepers,
    "W6": w6_schedules,
}
