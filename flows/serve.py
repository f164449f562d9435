"""Deployments and schedules, declared in one place.

``cns serve`` serves ``watch`` (interval), ``nightly`` (cron), ``personalize`` and ``forget`` (run on
demand, e.g. from the UI with a concept name) from this process against the Prefect server in
``PREFECT_API_URL``. For a GPU machine, ``prefect.yaml`` deploys ``personalize`` to a work pool
instead (see README, "GPU workers").
"""

from __future__ import annotations

import os
from datetime import timedelta

from cns.config import Config
from flows.pipeline import forget, nightly, personalize, watch
from tasks.learning import ensure_limits


def schedule_settings(config: Config) -> tuple[int, str, str]:
    """(watch interval s, nightly cron, timezone): params.yaml, overridden by the environment."""
    interval = int(os.environ.get("CNS_WATCH_INTERVAL") or config.pipeline.watch_interval_seconds)
    cron = os.environ.get("CNS_NIGHTLY_CRON") or config.pipeline.nightly_cron
    return interval, cron, config.pipeline.timezone


def deployments(config: Config, workspace: str) -> list:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron, Interval

    interval, cron, tz = schedule_settings(config)
    params = {"workspace": workspace}
    # A watch pass that finds the previous one still learning is cancelled, not queued: the
    # next tick learns whatever arrived meanwhile.
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    return [
        watch.to_deployment(name="watch", schedule=Interval(timedelta(seconds=interval)), parameters=params,
                            concurrency_limit=one_at_a_time,
                            description="Learn every ready dataset in the bucket, oldest first"),
        nightly.to_deployment(name="nightly", schedule=Cron(cron, timezone=tz), parameters=params,
                              description="Learn what is pending; re-check every concept (forgetting report)"),
        personalize.to_deployment(name="personalize", parameters=params,
                                  description="Learn one dataset: incoming/<concept>/"),
        forget.to_deployment(name="forget", parameters=params,
                             description="Remove one learned concept (parameter concept): a new version"),
    ]


def serve_all(config: Config, workspace: str) -> None:
    from prefect import serve

    ensure_limits(config)
    serve(*deployments(config, workspace))
