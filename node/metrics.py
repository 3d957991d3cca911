"""Prometheus metrics, read from the database at scrape time.

The database is the one place every process (SCP, workers, exporter) writes
to, so the exposition is a custom collector over it: counts are exact across
processes and restarts, and no module keeps global counters. Each scrape runs
a handful of aggregate queries; the job-duration histogram covers the most
recent ``duration_window`` finished jobs.

Metrics (all prefixed ``hpb_``):
- ``instances_received_total`` and ``series{state}``
- ``rejections_total{channel}``
- ``queue_depth`` (queued jobs), ``jobs{state}``
- ``job_duration_seconds`` histogram {pipeline}
- ``job_failures_total{reason}`` (first clause of the job's last error)
- ``outbox{state}`` and ``sends_failed_total{destination}``
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db import Instance, Job, JobState, OutboxItem, OutboxState, Rejection, Series

BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def failure_reason(last_error: str) -> str:
    """A low-cardinality reason label from a job's error text."""
    first = (last_error or "unknown").strip().splitlines()[0] if last_error.strip() else "unknown"
    return first.split(":", 1)[0].strip()[:60] or "unknown"


class DatabaseCollector(Collector):
    def __init__(self, sessions: sessionmaker[Any], duration_window: int = 1000) -> None:
        self.sessions = sessions
        self.duration_window = duration_window

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            yield from self._collect(session)

    def _collect(self, s: Session) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "hpb_instances_received", "DICOM instances received and kept"
        )
        received.add_metric([], float(s.scalar(select(func.count(Instance.id))) or 0))
        yield received

        series = GaugeMetricFamily("hpb_series", "Series by state", labels=["state"])
        for sstate, sn in s.execute(select(Series.state, func.count()).group_by(Series.state)):
            series.add_metric([str(sstate)], float(sn))
        yield series

        rejected = CounterMetricFamily(
            "hpb_rejections", "Instances or requests refused", labels=["channel"]
        )
        for channel, n in s.execute(
            select(Rejection.channel, func.count()).group_by(Rejection.channel)
        ):
            rejected.add_metric([channel], float(n))
        yield rejected

        jobs = GaugeMetricFamily("hpb_jobs", "Jobs by state", labels=["state"])
        counts = {st.value: 0 for st in JobState}
        for jstate, jn in s.execute(select(Job.state, func.count()).group_by(Job.state)):
            counts[str(jstate)] = int(jn)
        for name, count in counts.items():
            jobs.add_metric([name], float(count))
        yield jobs

        depth = GaugeMetricFamily("hpb_queue_depth", "Jobs waiting to run")
        depth.add_metric([], float(counts[JobState.QUEUED.value]))
        yield depth

        yield self._durations(s)

        failures = CounterMetricFamily(
            "hpb_job_failures", "Failed jobs by reason", labels=["reason"]
        )
        by_reason: dict[str, int] = {}
        for (error,) in s.execute(select(Job.last_error).where(Job.state == JobState.FAILED)):
            reason = failure_reason(error or "")
            by_reason[reason] = by_reason.get(reason, 0) + 1
        for reason, n in sorted(by_reason.items()):
            failures.add_metric([reason], float(n))
        yield failures

        outbox = GaugeMetricFamily("hpb_outbox", "Result objects by send state", labels=["state"])
        ocounts = {st.value: 0 for st in OutboxState}
        for ostate, on in s.execute(
            select(OutboxItem.state, func.count()).group_by(OutboxItem.state)
        ):
            ocounts[str(ostate)] = int(on)
        for name, count in ocounts.items():
            outbox.add_metric([name], float(count))
        yield outbox

        sends_failed = CounterMetricFamily(
            "hpb_sends_failed", "Result objects not delivered", labels=["destination"]
        )
        for dest, n in s.execute(
            select(OutboxItem.destination, func.count())
            .where(OutboxItem.state == OutboxState.FAILED)
            .group_by(OutboxItem.destination)
        ):
            sends_failed.add_metric([dest], float(n))
        yield sends_failed

    def _durations(self, s: Session) -> Metric:
        hist = HistogramMetricFamily(
            "hpb_job_duration_seconds", "Run time of finished jobs", labels=["pipeline"]
        )
        rows = s.execute(
            select(Job.pipeline, Job.started_at, Job.finished_at)
            .where(Job.started_at.is_not(None), Job.finished_at.is_not(None))
            .order_by(Job.finished_at.desc())
            .limit(self.duration_window)
        ).all()
        per: dict[str, list[float]] = {}
        for pipeline, started, finished in rows:
            if started is None or finished is None:
                continue
            per.setdefault(pipeline, []).append(max(0.0, (finished - started).total_seconds()))
        for pipeline, values in sorted(per.items()):
            buckets = [(str(b), float(sum(v <= b for v in values))) for b in BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            hist.add_metric([pipeline], buckets, sum_value=sum(values))
        return hist


def metrics_registry(sessions: sessionmaker[Any]) -> CollectorRegistry:
    """A registry of its own (never the process-global one) over the node database."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(sessions))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
