"""``pgflow.metrics.SERIES`` names what a scrape shows, no more and no less (no database needed).

The dashboards and alert rules in docs/observability are checked against
SERIES (tests/unit/test_observability_docs.py); this test keeps SERIES true
to the metrics the worker records and the queue collector reads.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pgflow import metrics


def samples(registry: CollectorRegistry) -> dict[str, set[tuple[str, ...]]]:
    """Label names of every sample, by sample name (``_created`` series left out)."""
    found: dict[str, set[tuple[str, ...]]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            found.setdefault(sample.name, set()).add(tuple(sorted(sample.labels)))
    return found


def fixed_queues(rows: list[tuple[str, str, int, float]]) -> metrics.QueueCollector:
    """The queue collector with these rows instead of a database."""
    return metrics.QueueCollector("unused", read=lambda dsn: rows)


def test_series_lists_every_sample_a_scrape_shows_with_its_labels():
    registry = CollectorRegistry()
    instruments = metrics.PrometheusInstruments(registry)
    instruments.claimed("default", 0.004)
    instruments.step_ended("orders", "charge", "completed", 0.02)
    instruments.run_ended("orders", "completed")
    instruments.run_started()
    instruments.run_left()
    registry.register(fixed_queues([("default", "pending", 3, 12.5),
                                   ("default", "running", 1, 0.0)]))
    shown = samples(registry)
    assert set(shown) == set(metrics.SERIES)
    for name, labels in shown.items():
        assert labels == {tuple(sorted(metrics.SERIES[name]))}, name


def test_the_oldest_ready_age_is_the_largest_of_a_queue():
    registry = CollectorRegistry()
    registry.register(fixed_queues([("a", "held", 2, 0.0), ("a", "pending", 1, 30.0),
                                   ("b", "pending", 0, 0.0)]))
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in registry.collect() for s in family.samples}
    assert values[("pgflow_queue_oldest_ready_seconds", (("queue", "a"),))] == 30.0
    assert values[("pgflow_queue_oldest_ready_seconds", (("queue", "b"),))] == 0.0
    assert values[("pgflow_queue_runs", (("queue", "a"), ("status", "held")))] == 2


def test_recording_is_off_unless_asked():
    off = metrics.instruments(False)
    assert not off.enabled
    off.claimed("q", 1.0)  # a no-op, not an error
    assert metrics.instruments(True) is metrics.instruments(True)


@pytest.mark.parametrize("outcome", ["completed", "retrying", "failed"])
def test_a_step_outcome_counts_once(outcome):
    registry = CollectorRegistry()
    instruments = metrics.PrometheusInstruments(registry)
    instruments.step_ended("wf", "s", outcome, 0.5)
    assert registry.get_sample_value(
        "pgflow_steps_total", {"workflow": "wf", "step": "s", "outcome": outcome}) == 1
    assert registry.get_sample_value(
        "pgflow_step_duration_seconds_count", {"workflow": "wf", "step": "s"}) == 1
