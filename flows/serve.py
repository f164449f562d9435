"""Deployments and schedules, declared in one place.

``cns serve`` serves ``watch`` (interval), ``nightly`` (cron), ``personalize`` and ``forget`` (run on
demand, e.g. from the UI with a concept name) from this process against the Prefect server in
``PREFECT_API_URL``, and starts a watch pass within seconds of a bucket event (tasks/events.py;
the interval schedule is the fallback). For a GPU machine, ``prefect.yaml`` deploys ``personalize`` to a work pool
instead (see README, "GPU workers").
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from cns.config import Config
from flows.pipeline import forget, lineage, nightly, personalize, watch
from tasks.learning import ensure_limits

log = logging.getLogger(__name__)

# A pass whose outcomes hold one of these changed something; only then is the bucket looked at
# again at once (a dataset deferred because it changed while read waits for the settle time).
MOVED = frozenset({"learned", "rejected", "forgotten", "absent"})


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


LINEAGE_POOL = "cns-lineages"
LINEAGE_DEPLOYMENT = "lineage/lineage"


def deploy_lineage(pool: str = LINEAGE_POOL) -> str:
    """The ``lineage`` flow as a deployment of the process work pool ``pool`` (made when missing),
    by module path, so any machine with cns-pipeline installed runs it: ``prefect worker start
    --pool POOL``. Returns the deployment's name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass
    lineage.to_deployment(name="lineage", work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH,
                          description="One watch pass of a lineage that lives in S3 (parameter bucket)").apply()
    return LINEAGE_DEPLOYMENT


def run_lineages(buckets: list[str]) -> list[str]:
    """A ``lineage`` flow run per bucket, queued for the pool's workers; their ids."""
    from prefect.deployments import run_deployment

    return [str(run_deployment(LINEAGE_DEPLOYMENT, parameters={"bucket": b}, timeout=0).id) for b in buckets]


def event_pass(workspace: str):
    """The check a bucket event wakes (tasks/events.py): one scan; a watch pass in this process
    when a dataset is pending or a removal request waits; returns the seconds until the first
    settling dataset is ready (None: nothing settling)."""
    from tasks import bucket, s3
    from tasks.learning import scan_datasets
    from tasks.versioning import open_workspace

    def run(reason: str) -> float | None:
        ws = open_workspace(workspace)
        datasets = scan_datasets(ws, ws.config())
        pending = [d.concept for d in datasets if d.state == "pending"]
        if pending or bucket.removal_requests(s3.client(), s3.bucket_name()):
            log.info("bucket event (%s): a watch pass for %s", reason, ", ".join(pending) or "a removal request")
            outcomes = watch.with_options(flow_run_name="watch-event")(workspace)
            if any(o.get("outcome") in MOVED for o in outcomes):
                return 0.0  # look again at once: what landed during the pass
            # nothing moved (a folder changed while it was read): not before it may have settled
            return max(bucket.settle_seconds(), 1.0)
        waits = [d.settles_in for d in datasets if d.state == "settling" and d.settles_in is not None]
        return min(waits) + 0.2 if waits else None

    return run


def start_events(config: Config, workspace: str):
    """Subscribe to the stack's bucket-event relay (tasks/events.py) when ``CNS_EVENTS_URL`` and
    ``CNS_EVENTS_TOKEN`` are set (``cns stack env``): (subscriber, trigger), or None (polling only)."""
    from tasks import s3
    from tasks.events import PassTrigger, Subscriber

    url, token = os.environ.get("CNS_EVENTS_URL"), os.environ.get("CNS_EVENTS_TOKEN")
    if not url or not token:
        log.info("no CNS_EVENTS_URL/CNS_EVENTS_TOKEN: new datasets are found by polling every %d s",
                 schedule_settings(config)[0])
        return None
    trigger = PassTrigger(event_pass(workspace))
    subscriber = Subscriber(url, token, s3.bucket_name(), trigger)
    trigger.start()
    subscriber.start()
    trigger.wake("start")  # whatever landed while nothing listened
    log.info("bucket events from %s start a pass within seconds; polling every %d s stays as the fallback",
             url, schedule_settings(config)[0])
    return subscriber, trigger


def serve_all(config: Config, workspace: str) -> None:
    from prefect import serve

    ensure_limits(config)
    events = start_events(config, workspace)
    try:
        serve(*deployments(config, workspace))
    finally:
        if events:
            events[0].stop()
            events[1].stop(timeout=1)
