"""Deployments and schedules (no server needed to build them)."""

from __future__ import annotations

from datetime import timedelta

from cns.config import config_from_dict


def test_serve_declares_watch_nightly_and_personalize_with_their_schedules(monkeypatch):
    from flows.serve import deployments

    monkeypatch.delenv("CNS_WATCH_INTERVAL", raising=False)
    monkeypatch.setenv("CNS_NIGHTLY_CRON", "30 3 * * *")
    config = config_from_dict({"pipeline": {"watch_interval_seconds": 45, "timezone": "Europe/Paris"}})
    by_name = {d.name: d for d in deployments(config, "/some/workspace")}
    assert set(by_name) == {"watch", "nightly", "personalize", "forget"}
    assert by_name["watch"].schedules[0].schedule.interval == timedelta(seconds=45)
    nightly = by_name["nightly"].schedules[0].schedule
    assert (nightly.cron, nightly.timezone) == ("30 3 * * *", "Europe/Paris")
    assert not by_name["personalize"].schedules and not by_name["forget"].schedules
    assert by_name["watch"].concurrency_limit == 1
    assert all(d.parameters == {"workspace": "/some/workspace"} for d in by_name.values())
