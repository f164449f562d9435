"""Event-driven ingest on the real stack (issue 11, item 3): the filer's webhook reaches the
stack's event relay, a `cns serve` subscribed to it learns a dropped dataset within seconds while
its poll interval is an hour, and a dataset uploaded without `cns drop`'s completeness claim is
learned once it has settled, not before. The relay's door: only /health without the token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tasks import bucket, s3, stack

from stack_helpers import make_concept, own_workspace, runs_tagged

pytestmark = pytest.mark.stack

FEWEST_STEPS = {"train": {"max_train_steps": 1, "reg_generic_prompts": 1},
                "scoring": {"num_score_samples": 1, "score_batch_size": 1},
                "generate": {"num_inference_steps": 1, "num_images_per_prompt": 1},
                "evaluate": {"prompts": ["a photo of a {token} {class_noun}"], "num_inference_steps": 1,
                             "num_images_per_prompt": 1, "loss_draws": 1, "recheck_per_version": 0}}
SETTLE = 6


def relay_events(config, after=0, token=None):
    token = token if token is not None else stack.events_token(config.root)
    request = urllib.request.Request(f"{config.events_url}/events?after={after}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def test_the_relay_answers_only_health_without_the_token_and_its_files_are_private(running_stack):
    config = running_stack.config
    with urllib.request.urlopen(f"{config.events_url}/health", timeout=10) as resp:
        assert resp.status == 200
    for token in ("", "wrong-token-of-enough-length"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            relay_events(config, token=token)
        assert exc.value.code == 401
    for name in (stack.EVENTS_TOKEN_FILE, stack.NOTIFICATION_FILE):
        assert (config.root / name).stat().st_mode & 0o077 == 0
    logs = (config.root / "logs" / "events.log").read_text(errors="replace")
    assert stack.events_token(config.root) not in logs


def test_the_filer_posts_every_bucket_change_to_the_relay(running_stack, concept_name):
    config = running_stack.config
    start = relay_events(config)["next"]
    key = f"incoming/{concept_name}/00.png"
    running_stack.client().put_object(Bucket=running_stack.bucket, Key=key, Body=b"png")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        keys = [(e["bucket"], e["key"]) for e in relay_events(config, after=start)["events"]]
        if (running_stack.bucket, key) in keys:
            break
        time.sleep(0.1)
    assert (running_stack.bucket, key) in keys


def test_a_dropped_dataset_is_ready_at_once_and_a_plain_upload_only_once_settled(running_stack, tmp_path,
                                                                                   concept_name, monkeypatch):
    monkeypatch.setenv("CNS_SETTLE_SECONDS", "60")
    client, name = running_stack.client(), running_stack.bucket
    limits = __import__("cns.config", fromlist=["LimitsConfig"]).LimitsConfig()
    dropped = make_concept(tmp_path, f"{concept_name}-d")
    bucket.drop(client, name, dropped)
    plain = make_concept(tmp_path, f"{concept_name}-p")
    for path in sorted(plain.iterdir()):  # images first, manifest last, but no claim
        client.upload_file(str(path), name, f"incoming/{plain.name}/{path.name}")
    states = {d.concept: d for d in bucket.scan(client, name, limits=limits, lineage=None)}
    assert states[dropped.name].state == "pending"
    assert states[plain.name].state == "settling" and 55 < states[plain.name].settles_in <= 60
    # an image added after the drop breaks the claim: the folder settles like any other
    client.upload_file(str(plain / "00.png"), name, f"incoming/{dropped.name}/99.png")
    assert bucket.scan(client, name, limits=limits, lineage=None, concept=dropped.name)[0].state == "settling"
    # so does an image replaced after the manifest by one of the same size (a re-upload that
    # keeps an old vouching manifest): the manifest must be the newest object
    again = make_concept(tmp_path, f"{concept_name}-r")
    bucket.drop(client, name, again)
    assert bucket.scan(client, name, limits=limits, lineage=None, concept=again.name)[0].state == "pending"
    time.sleep(1.1)  # LastModified has whole seconds
    client.upload_file(str(again / "00.png"), name, f"incoming/{again.name}/00.png")
    assert bucket.scan(client, name, limits=limits, lineage=None, concept=again.name)[0].state == "settling"


@pytest.mark.timeout(900)
def test_serve_learns_a_drop_within_seconds_of_the_event_not_at_the_next_poll(running_stack, tmp_path_factory):
    with own_workspace(tmp_path_factory, "events", **FEWEST_STEPS) as (ws, name, root):
        env = {**os.environ, "CNS_WATCH_INTERVAL": "3600", "CNS_SETTLE_SECONDS": str(SETTLE)}
        log_path = root / "serve.log"
        cns = Path(sys.executable).parent / "cns"
        server = subprocess.Popen([str(cns), "serve", "--workspace", str(ws.root)], env=env,
                                  stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while "bucket events from" not in log_path.read_text(errors="replace"):
                assert server.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
                time.sleep(0.5)
            time.sleep(5)  # the first (empty) watch run the schedule starts at once is over

            def learned_after(concept: str, since: float, limit: float) -> float:
                while not (runs := runs_tagged(name, "cns.concept", concept)):
                    assert server.poll() is None, log_path.read_text(errors="replace")[-3000:]
                    assert time.time() - since < limit, f"{concept} not started after {limit} s: " + \
                        log_path.read_text(errors="replace")[-3000:]
                    time.sleep(0.2)
                return runs[0].info.start_time / 1000 - since

            dropped = make_concept(root / "src", "evented")
            bucket.drop(s3.client(), name, dropped)
            dropped_at = time.time()
            latency = learned_after("evented", dropped_at, 120)
            print(f"\nevents: training started {latency:.1f} s after `cns drop` returned (poll interval 3600 s)")
            assert latency < 30

            plain = make_concept(root / "src", "plain", seed=5)
            for path in sorted(plain.iterdir()):
                s3.client().upload_file(str(path), name, f"incoming/plain/{path.name}")
            uploaded_at = time.time()
            latency = learned_after("plain", uploaded_at, 180)
            print(f"events: a plain upload started {latency:.1f} s after it (settle time {SETTLE} s)")
            assert SETTLE - 1.5 <= latency < SETTLE + 30  # LastModified has whole seconds
        finally:
            os.killpg(server.pid, 2)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
