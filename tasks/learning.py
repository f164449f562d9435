"""Prefect tasks that learn one dataset: each a thin adapter around one ``cns`` step.

One flow run loads the model once: :func:`load_model` keeps the cumulative model of a workspace
in this process and hands the same object to every task (tasks pass references and small
results, the model stays where it is). A failed or rolled-back version drops it, so the next use
reloads exactly what is on disk. Scoring and finetuning are tagged ``gpu``; a tag concurrency
limit bounds how many run at once, and :func:`lineage_lock` serializes writes to one lineage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import re
import resource
import shutil
import tempfile
import uuid
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from cns.concept import Concept, ConceptError
from cns.config import Config
from cns.errors import CNSError
from cns.lock import LockTimeout, lock_path, model_lock
from cns.cumulative import CumulativeModel, open_model
from cns.evaluate import load_judges
from cns import learn as steps
from cns.lineage import DELTA, MASK, ConceptRecord, concept_file, read_lineage
from cns.report import ModelEvaluation, evaluate_model, write_metrics
from tasks import bucket, lineages, s3, tracking, versioning
from tasks.faults import fault_point
from tasks.versioning import Workspace

log = logging.getLogger(__name__)

_SESSIONS: dict[Path, CumulativeModel] = {}
_LIMITS_READY: set[str] = set()
# The commit a run's version was made as, set before it is published: of two runs claiming one
# version, recovery keeps the one whose commit the lineage holds (tasks.lineages).
CANDIDATE = "cns.candidate_commit"
step_task = task(cache_policy=NO_CACHE)  # in-memory objects as inputs: nothing to cache or hash


# ---- concurrency ------------------------------------------------------------------------------

def lock_name(config: Config) -> str:
    return f"cns-lineage-{config.pipeline.model_name}"


def ensure_limits(config: Config) -> bool:
    """Create the lineage lock (1 slot) on the Prefect server, if any."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(lock_name(config))
            except ObjectNotFound:
                # Two workers starting at once both find none; the second create is a conflict.
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=lock_name(config),
                                                                                        limit=1))
    except (OSError, RuntimeError) as exc:  # no server reachable: the file lock still serializes
        log.warning("could not set Prefect concurrency limits: %s", exc)
        return False
    return True


@contextlib.contextmanager
def lineage_lock(ws: Workspace, config: Config, timeout_seconds: float | None = None):
    """One writer per lineage: the model's file lock (``cns.lock``: any process on this machine,
    ``cns learn`` and ``cns forget`` included, with or without a Prefect server) inside the Prefect
    global concurrency limit (workers sharing a server). Each wait gives up after
    ``timeout_seconds`` (default ``pipeline.lock_timeout_seconds``) with a LockTimeout naming the
    lock and its holder."""
    from prefect.concurrency.sync import concurrency

    timeout = config.pipeline.lock_timeout_seconds if timeout_seconds is None else timeout_seconds
    if lock_name(config) not in _LIMITS_READY and ensure_limits(config):
        _LIMITS_READY.add(lock_name(config))
    with waiting(ws) as mine, \
            model_lock(ws.model_dir, timeout, what=f"cns pipeline, {_flow_run_label()}") as killed_holder, \
            contextlib.ExitStack() as held:
        if killed_holder:
            mark_crashed(killed_holder)
        crash_dead_waiters(ws, mine)
        release_dead_lease(ws)
        try:
            # A 60 s lease (the shortest Prefect allows), renewed while held: a holder killed on
            # another machine frees the lineage within about a minute; one killed on this machine
            # at once (its lease id is in lease_path, released above).
            held.enter_context(recorded_lease(ws, concurrency(lock_name(config), occupy=1, timeout_seconds=timeout,
                                                              lease_duration=60)))
        except TimeoutError:
            raise LockTimeout(f"Prefect global concurrency limit {lock_name(config)}",
                              f"no slot free after {timeout:g} s: another worker holds it (see Concurrency in the "
                              "Prefect UI), or a slot was left taken; free it with `prefect gcl update "
                              f"{lock_name(config)} --active-slots 0` once no pass runs") from None
        yield


def lease_path(ws: Workspace) -> Path:
    """``data/.model.lease``: the Prefect lease id of the pass that holds the lineage on this
    machine, written and removed under the model's file lock; still there while the lock is free,
    it belongs to a pass that was killed holding it."""
    return lock_path(ws.model_dir).with_suffix(".lease")


def release_dead_lease(ws: Workspace) -> str | None:
    """Release the Prefect slot of a pass killed on this machine while it held the lineage (call
    with the model's file lock held): its lease would otherwise keep the slot taken until it
    expires, a minute of every next pass waiting. Returns the lease id released, else None."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    path = lease_path(ws)
    try:
        lease = uuid.UUID(path.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:  # half-written when its holder was killed: nothing to release
        path.unlink(missing_ok=True)
        return None
    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id=lease)
        log.warning("released the lineage's Prefect slot held by a pass killed on this machine (lease %s)", lease)
    except ObjectNotFound:  # expired already
        pass
    except Exception as exc:  # best effort (server down, ...): the lease expires within a minute anyway
        log.warning("could not release the Prefect lease of a killed pass (%s): %s", lease, exc)
    path.unlink(missing_ok=True)
    return str(lease)


@contextlib.contextmanager
def recorded_lease(ws: Workspace, slot):
    """Enter Prefect's ``concurrency`` context ``slot`` and keep the lease id it was granted in
    ``lease_path`` while it is held. Prefect records each granted lease in the active
    ConcurrencyContext (to release it if the holder is cancelled); a Prefect that does not leaves
    no file, and a killed holder's slot is then freed when its lease expires."""
    from prefect.concurrency.context import ConcurrencyContext

    path = lease_path(ws)
    with ConcurrencyContext() as granted, slot:
        if granted.cleanup_lease_ids:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(f"{granted.cleanup_lease_ids[-1]}\n")
            tmp.replace(path)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def waiting_dir(ws: Workspace) -> Path:
    """``data/.model.waiting/``: one file per pass that waits for (or holds) the lineage."""
    return lock_path(ws.model_dir).with_suffix(".waiting")


@contextlib.contextmanager
def waiting(ws: Workspace):
    """While this pass waits for the lineage and holds it, a file of its own naming its flow run,
    flock-ed by it: the kernel frees that flock when the process dies, so a file whose flock can be
    taken belongs to a pass that was killed (while waiting, where the lock file's holder line
    cannot tell). Yields the file, or None outside a flow run (nothing to mark then)."""
    label = _flow_run_label()
    if label == "no flow run":
        yield None
        return
    directory = waiting_dir(ws)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / uuid.uuid4().hex
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(label + "\n")
        handle.flush()
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


def crash_dead_waiters(ws: Workspace, mine: Path | None) -> list[str]:
    """Mark Crashed the flow runs of passes killed while they waited for the lineage (their files'
    flocks are free); remove their files. Returns the marked runs' ids."""
    directory = waiting_dir(ws)
    marked = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if path == mine:
            continue
        try:
            with open(path) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its pass is alive, still waiting
                label = handle.read().strip()
                path.unlink(missing_ok=True)
        except FileNotFoundError:  # its pass just finished
            continue
        if label and (run_id := mark_crashed(label, "waited for the lineage")):
            marked.append(run_id)
    return marked


def _flow_run_label() -> str:
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name} ({flow_run.id})" if flow_run.id else "no flow run"


def mark_crashed(holder: str, doing: str = "held the lineage") -> str | None:
    """Set Crashed the Prefect flow run of a pass that was killed while it held the lineage
    (``holder``: the line it left in the lock file), if it still reads Running or Pending: nothing
    else ever would, as Prefect does not watch a flow run's process. Returns its id, or None."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.states import Crashed

    match = re.search(r"flow run \S+ \(([0-9a-f-]{36})\)", holder)
    if not match:
        return None
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(uuid.UUID(match.group(1)))
            if run.state is None or not (run.state.is_running() or run.state.is_pending()):
                return None
            client.set_flow_run_state(run.id, Crashed(message=f"its process was killed while it {doing} ({holder}); "
                                                              "the next pass recovered the workspace"),
                                      force=True)
    except (ObjectNotFound, PrefectHTTPStatusError, OSError, RuntimeError) as exc:
        log.warning("could not mark the flow run of a killed pass Crashed (%s): %s", holder, exc)
        return None
    log.warning("flow run %s was left %s by a killed process: marked Crashed", run.name, run.state.name)
    return str(run.id)


# ---- the model of this flow run ---------------------------------------------------------------

@step_task(name="load-model")
def load_model(ws: Workspace, config: Config) -> CumulativeModel:
    """The workspace's model, loaded once per process and version."""
    lineage = read_lineage(ws.model_dir)
    version = lineage.version if lineage else 0
    cached = _SESSIONS.get(ws.root)
    if cached is not None and cached.lineage.version == version:
        return cached
    _SESSIONS[ws.root] = open_model(ws.model_dir, config)
    return _SESSIONS[ws.root]


def drop_model(ws: Workspace) -> None:
    _SESSIONS.pop(ws.root, None)


@step_task(name="recover-workspace")
def recover(ws: Workspace, config: Config) -> dict:
    """Finish or undo what a crashed run left: clear git locks of a killed git command, tag a
    version committed but not tagged, roll back an uncommitted model version, complete the MLflow
    run and registry version of a committed one, mark the others rolled back. A clone of a lineage
    that lives in S3 is first brought to the lineage's newest published version (tasks.lineages)."""
    versioning.clear_stale_git_locks(ws)
    if lineages.sync(ws):
        drop_model(ws)
    tagged = versioning.complete_untagged_version(ws)
    thrown = versioning.rollback_uncommitted(ws)
    if thrown is not None:
        drop_model(ws)
    committed = versioning.last_version(ws)
    completed, rolled_back = [], []
    for run in tracking.unfinished_runs(config):
        version = int(run.data.tags.get(tracking.VERSION, 0))
        owner = tracking.registered_run(config, version) if 0 < version <= committed else None
        commit = versioning.git(ws, "rev-list", "-n", "1", f"{versioning.TAG_PREFIX}{version}") \
            if 0 < version <= committed else None
        if owner not in (None, run.info.run_id):  # an orphan of a retried start: never the version's run
            tracking.mark_rolled_back(run.info.run_id, f"model v{version} is run {owner}'s; this one is a duplicate")
            rolled_back.append(run.info.run_id)
        elif commit and run.data.tags.get(CANDIDATE, commit) != commit:
            # a lineage clone's version that lost the compare-and-swap to another worker's commit
            tracking.mark_rolled_back(run.info.run_id, f"model v{version} was published by another worker "
                                      f"(commit {commit[:12]}); this run's commit never became a version")
            rolled_back.append(run.info.run_id)
        elif commit:
            tags = version_tags(ws, version)
            # What the register task sets first (a kill after the tag skipped it): the run's links.
            tracking.set_tags(run.info.run_id, {"cns.git_tag": tags["git_tag"],
                                                "cns.workspace_commit": tags["workspace_commit"],
                                                "cns.dvc_hash": tags["dvc_hash"]})
            tracking.register_version(config, run.info.run_id, version, tags)
            completed.append(version)
        else:
            tracking.mark_rolled_back(run.info.run_id, "the process stopped before the version was committed")
            rolled_back.append(run.info.run_id)
    return {"rolled_back_version": thrown, "tagged": tagged, "completed": completed, "failed_runs": rolled_back}


def version_tags(ws: Workspace, version: int) -> dict[str, str]:
    tag = f"{versioning.TAG_PREFIX}{version}"
    return {"git_tag": tag, "workspace_commit": versioning.git(ws, "rev-list", "-n", "1", tag),
            "dvc_hash": versioning.dvc_hash(ws) or ""}


# ---- the bucket -------------------------------------------------------------------------------

def scan_datasets(ws: Workspace, config: Config, concept: str | None = None) -> list[bucket.Dataset]:
    """Every dataset of the bucket (settling and incomplete ones too), learned per the workspace's lineage."""
    client = s3.client()
    name = s3.bucket_name()
    return bucket.scan(client, name, limits=config.limits, lineage=read_lineage(ws.model_dir),
                       cache=bucket.HashCache(bucket.default_cache_path(client, name)), concept=concept)


@task(name="find-datasets", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def find_datasets(ws: Workspace, config: Config, concept: str | None = None) -> list[bucket.Dataset]:
    """Ready datasets with their states (learned per the workspace's lineage), oldest first."""
    datasets = scan_datasets(ws, config, concept)
    return sorted((d for d in datasets if d.ready), key=lambda d: (d.ready_at or "", d.concept))


@task(name="fetch-dataset", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def fetch_dataset(ws: Workspace, config: Config, dataset: bucket.Dataset) -> tuple[Concept | None, str | None]:
    """Download and validate into ``data/datasets/<name>``: (concept, None). A bad dataset is
    rejected (its ``error.json`` written) and (None, its error code) returned, with nothing else
    changed; a dataset that changed while read gives (None, "dataset_changed") and stays pending."""
    client = s3.client()
    name = s3.bucket_name()
    ws.datasets_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=ws.datasets_dir) as tmp:
        try:
            concept = bucket.validate(client, name, dataset, Path(tmp), limits=config.limits,
                                      lineage=read_lineage(ws.model_dir))
        except ConceptError as exc:
            bucket.reject(client, name, dataset, exc)
            return None, exc.code
        fault_point("fetch")
        target = ws.datasets_dir / concept.name
        if target.exists():  # left by an attempt that was rolled back
            shutil.rmtree(target)
        Path(tmp, dataset.concept).rename(target)
    # Validated already: only the paths move (no second decode of every image).
    return dataclasses.replace(concept, directory=target,
                               image_paths=tuple(target / p.name for p in concept.image_paths)), None


def dataset_problem(exc: BaseException, concept: Concept) -> bool:
    """Whether an error raised after the fetch is the dataset's own: a CNSError that names one of
    the dataset's files (its manifest or an image, e.g. a class noun the tokenizer reads as the
    token). Anything else (S3, git/DVC, MLflow, Prefect, disk, the model's own files) is left to
    fail the pass, so the dataset stays pending and the next pass retries it."""
    if not isinstance(exc, CNSError) or isinstance(exc, (s3.S3Error, versioning.WorkspaceError)):
        return False
    if concept.directory is None:
        return False
    folder = Path(concept.directory).resolve()
    path = Path(exc.path).resolve() if exc.path else None
    return path is not None and (path == folder or folder in path.parents)


@task(name="reject-dataset", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def reject_dataset(ws: Workspace, config: Config, dataset: bucket.Dataset, concept: Concept, run_id: str,
                   error: CNSError) -> str:
    """A dataset that failed for a reason of its own after the fetch: its ``error.json`` (naming the
    object in the bucket, not the local copy), its MLflow run closed as rejected, and the workspace
    put back to the last version (the fetched copy and anything written are removed)."""
    drop_model(ws)
    name = s3.bucket_name()
    prefix = f"s3://{name}/{bucket.INCOMING}{dataset.concept}"
    where = Path(error.path).resolve().relative_to(Path(concept.directory).resolve())
    path = prefix + ("/" + str(where) if str(where) != "." else "/")
    key = bucket.reject(s3.client(), name, dataset, ConceptError(path, error.message, error.code))
    tracking.mark_rejected(run_id, error.code, f"{path}: {error.message}")
    versioning.rollback_uncommitted(ws)
    if Path(concept.directory).exists():
        shutil.rmtree(concept.directory)
    return key


# ---- the method ---------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# One task per step of cns.learn, under the step's own name: the Prefect UI, the lineage's
# ``timings`` and the MLflow ``time/<step>_s`` metrics say the same words.

@step_task(name="prepare")
def prepare(model: CumulativeModel, concept: Concept, config: Config) -> steps.PreparedConcept:
    """Add the token, encode the images, build the sampler of training pairs."""
    return steps.prepare(model, concept, config)


@step_task(name="general")
def general(model: CumulativeModel, config: Config):
    """The base model's general neurons (cached per base model and calibration settings)."""
    return steps.general(model, config)[0]


@contextlib.contextmanager
def on_device(model: CumulativeModel, config: Config):
    """Hold one of this machine's ``pipeline.gpu_task_concurrency`` slots of the model's device
    (cns.lock.device_slot) while a step scores or trains. A machine-local file lock, not a Prefect
    tag limit: that one is global to the server (one GPU task in the whole pool, whatever the
    number of GPUs), and its slot comes back only after the task's lease is released, which cost
    each learn two waits of about 2 s (the server's Retry-After) between scoring and training."""
    from cns.lock import device_slot

    with device_slot(str(model.model.device), config.pipeline.gpu_task_concurrency,
                     config.pipeline.lock_timeout_seconds, what=f"cns pipeline, {_flow_run_label()}"):
        yield


@step_task(name="score")
def score(model: CumulativeModel, prepared: steps.PreparedConcept, config: Config):
    """Score every K/V row for the concept."""
    with on_device(model, config):
        scores = steps.score(model, prepared, config, progress=False)
    prepared.peak_rss_mb["score"] = peak_rss_mb()
    return scores


@step_task(name="select")
def select(model: CumulativeModel, prepared: steps.PreparedConcept, scores, general_mask, config: Config):
    """The concept's rows: its base neurons minus the general ones and those earlier concepts own."""
    with steps.timed(prepared, "select"):
        selection = steps.select(model, scores, general_mask, config)
    fault_point("score")
    return selection


@step_task(name="train")
def train(model: CumulativeModel, prepared: steps.PreparedConcept, selection, config: Config):
    with on_device(model, config):
        result = steps.train(model, prepared, selection, config, progress=False)
    prepared.peak_rss_mb["train"] = peak_rss_mb()
    return result


@step_task(name="reference")
def reference(model: CumulativeModel, prepared: steps.PreparedConcept, config: Config):
    """The concept's fixed-seed samples right after learning (the forgetting measure's reference)."""
    return steps.reference_samples(model, prepared, config)


@step_task(name="commit")
def commit(model: CumulativeModel, prepared: steps.PreparedConcept, selection, scores, result,
           dataset_hash: str, config: Config, reference_images) -> ConceptRecord:
    """The concept's files and the new lineage in ``data/model`` (not yet versioned)."""
    record = steps.commit(model, prepared, selection, scores, result, dataset_hash, config, reference_images)
    fault_point("commit")
    return record


@step_task(name="evaluate")
def evaluate(ws: Workspace, model: CumulativeModel, config: Config, write: bool = True,
             every_concept: bool = False) -> ModelEvaluation:
    """The metrics at this version of the newest concept and a rotating few earlier ones
    (``evaluate.recheck_per_version``), or of ``every_concept``; written to ``metrics/`` when ``write``."""
    from cns.report import recheck_sample

    names = [c.name for c in model.lineage.concepts]
    chosen = None if every_concept else recheck_sample(names, model.lineage.version,
                                                       config.evaluate.recheck_per_version)
    evaluation = evaluate_model(model, config, load_judges(config.evaluate, model.model.device), ws.datasets_dir,
                                concepts=chosen)
    if write:
        write_metrics(evaluation, ws.metrics_dir)
    return evaluation


# ---- tracking -----------------------------------------------------------------------------------

def version_metrics(record: ConceptRecord, prepared: steps.PreparedConcept, result) -> dict:
    from cns.info import short_layer_name

    s = record.stats
    metrics = {
        "neurons/total": s["neurons_total"], "neurons/overlap_with_earlier": s["overlap_with_earlier"],
        "weights/changed": s["weights_changed"], "weights/percent_unet": s["percent_unet_weights"],
        "weights/percent_kv_rows": s["percent_kv_rows"], "delta/bytes": s["delta_bytes"],
        **{f"selection/{k}": v for k, v in s["selection"].items()},
        **{f"neurons/layer/{short_layer_name(k)}": v for k, v in s["neurons_per_layer"].items()},
        "train/trainable_parameters": result.trainable_parameters,
        "train/optimizer_state_bytes": result.optimizer_state_bytes,
        # null-space rows: text-state directions closed to this concept's rows (of train/text_dim)
        "train/protected_directions": result.protected_directions, "train/text_dim": result.text_dim,
    }
    metrics.update({f"time/{step}_s": value for step, value in prepared.seconds.items()})
    metrics.update({f"memory/{step}_peak_rss": value for step, value in prepared.peak_rss_mb.items()})
    if result.peak_memory_bytes is not None:
        metrics["memory/train_peak_gpu_mb"] = result.peak_memory_bytes / 2**20
    return metrics


@task(name="start-run", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def start_run(config: Config, concept: Concept, dataset: bucket.Dataset, version: int) -> str:
    """The concept's MLflow run (state ``running`` until its version is registered)."""
    prompts = concept.training_prompts(config.train.prompt_template)
    return tracking.start_concept_run(
        config, concept=concept.name, token=concept.token, class_noun=concept.class_noun,
        dataset_hash=dataset.hash, dataset_uri=f"s3://{s3.bucket_name()}/incoming/{dataset.concept}/",
        version=version, base=config.model.pretrained_model_name_or_path,
        images={p.name: concept.captions.get(p.name) or " | ".join(prompts) for p in concept.image_paths})


def review_artifacts(out: Path, evaluation: ModelEvaluation, metrics_dir: Path, config: Config,
                     title: str = "output change since learned") -> None:
    """``samples/<concept>.png`` and ``forgetting/`` (history CSV, eval.json, matrix CSV + PNG)
    under ``out``, from an evaluation and the metrics directory that holds its rows."""
    from cns.report import forgetting_matrix
    from tasks import plots

    for name, samples in evaluation.samples.items():
        plots.save_grid(samples, out / "samples" / f"{name}.png", per_row=config.evaluate.num_images_per_prompt)
    forgetting = out / "forgetting"
    forgetting.mkdir()
    shutil.copy(metrics_dir / "forgetting.csv", forgetting / "forgetting.csv")
    shutil.copy(metrics_dir / "eval.json", forgetting / "eval.json")
    matrix = forgetting_matrix(metrics_dir / "forgetting.csv")
    matrix.to_csv(forgetting / "forgetting_matrix.csv")
    plots.forgetting_heatmap(matrix, forgetting / "forgetting.png", title=title)


@task(name="log-run", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def log_run(ws: Workspace, config: Config, run_id: str, record: ConceptRecord, prepared: steps.PreparedConcept,
            result, evaluation: ModelEvaluation) -> None:
    """Metrics, the loss curve and every artifact a reviewer needs, to the concept's MLflow run."""
    import json

    from cns.delta import load_masks
    from tasks import plots, serving

    tracking.log_metrics(run_id, {**version_metrics(record, prepared, result),
                                  **evaluation.flat_metrics()})
    tracking.log_series(run_id, "train/loss", result.losses)
    fault_point("mlflow-log")
    tracking.set_tags(run_id, {f"eval.{name}.{k}": v for name, m in evaluation.metrics.items()
                               for k, v in m.items() if not isinstance(v, (int, float))})
    mask, delta = concept_file(ws.model_dir, record.name, MASK), concept_file(ws.model_dir, record.name, DELTA)
    with tempfile.TemporaryDirectory(prefix="cns-artifacts-") as tmp:
        out = Path(tmp)
        (out / "neurons").mkdir()
        shutil.copy(mask, out / "neurons" / MASK)
        summary = {k: record.stats[k] for k in ("neurons_total", "neurons_per_layer", "overlap_with_earlier",
                                                  "weights_changed", "percent_unet_weights", "selection")}
        (out / "neurons" / "neurons.json").write_text(json.dumps(summary, indent=2))
        plots.mask_heatmap(load_masks(mask)[0], out / "neurons" / "neurons.png",
                           title=f"v{record.version} {record.name}: selected neurons per layer")
        (out / "delta").mkdir()
        shutil.copy(delta, out / "delta" / DELTA)
        review_artifacts(out, evaluation, ws.metrics_dir, config)
        tracking.log_sample_images(run_id, {name: out / "samples" / f"{name}.png" for name in evaluation.samples},
                                   record.version)
        (out / "plots").mkdir()
        plots.loss_curve(result.losses, out / "plots" / "loss.png", title=f"training loss: {record.name}")
        serving.save_model(ws.model_dir, out / "model", config)  # the registry version's MLflow model
        (out / "model" / "README.md").write_text(
            f"Model version {record.version} ({record.name}). The weights are versioned with DVC: in the "
            f"workspace, `git checkout {versioning.TAG_PREFIX}{record.version} && dvc pull`.\n")
        tracking.log_artifacts(run_id, {p.name: p for p in out.iterdir()})


@task(name="log-nightly", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def log_nightly(ws: Workspace, config: Config, evaluation: ModelEvaluation) -> dict:
    """A nightly MLflow run: every concept's metrics and samples, and the forgetting matrix of the
    versions so far plus tonight's row (the workspace's metrics stay as they are)."""
    from datetime import datetime, timezone

    from cns.report import write_metrics

    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    run_id = tracking.start_report_run(config, f"nightly {day} (model v{evaluation.version})", evaluation.version)
    tracking.log_metrics(run_id, evaluation.flat_metrics())
    with tempfile.TemporaryDirectory(prefix="cns-nightly-") as tmp:
        metrics, out = Path(tmp, "metrics"), Path(tmp, "artifacts")
        metrics.mkdir()
        out.mkdir()
        if (ws.metrics_dir / "forgetting.csv").exists():
            shutil.copy(ws.metrics_dir / "forgetting.csv", metrics / "forgetting.csv")
        write_metrics(evaluation, metrics)
        review_artifacts(out, evaluation, metrics, config, title=f"output change since learned ({day})")
        tracking.log_sample_images(run_id, {name: out / "samples" / f"{name}.png" for name in evaluation.samples},
                                   evaluation.version)
        tracking.log_artifacts(run_id, {p.name: p for p in out.iterdir()})
    tracking.finish_report_run(run_id)
    return {"run_id": run_id, "version": evaluation.version, "concepts": list(evaluation.metrics)}


def _publish(ws: Workspace, run_id: str, version: int, versioned: dict[str, str]) -> None:
    """In a lineage clone: the run's candidate commit, then the version published (the lineage's
    from here). A workspace of its own has nothing to publish and no rival writer."""
    if versioning.lineage_bucket(ws) is not None:
        tracking.set_tags(run_id, {CANDIDATE: versioned["commit"]})
    fault_point("publish")
    lineages.publish(ws, version)  # nothing to do in a workspace of its own


def _unless_conflict(task, task_run, state) -> bool:
    """Retry a versioning task, except when another worker published the version (it stays so)."""
    try:
        state.result()
    except lineages.LineageConflict:
        return False
    except Exception:
        return True
    return True


@task(name="version-model", retries=2, retry_delay_seconds=5, retry_condition_fn=_unless_conflict,
      cache_policy=NO_CACHE)
def version_model(ws: Workspace, record: ConceptRecord, run_id: str) -> dict[str, str]:
    """dvc add + push (retried: storage), then git commit + tag ``model-vN`` (idempotent), then, in
    a lineage clone, publish it."""
    versioning.add_and_push(ws, record)
    versioned = versioning.commit_and_tag(ws, record)
    _publish(ws, run_id, record.version, versioned)
    return versioned


@task(name="register-version", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def register(ws: Workspace, config: Config, run_id: str, record: ConceptRecord, versioned: dict[str, str]) -> str:
    fault_point("registry")
    tracking.set_tags(run_id, {"cns.git_tag": versioned["tag"], "cns.workspace_commit": versioned["commit"],
                               "cns.dvc_hash": versioned["dvc_hash"]})
    return tracking.register_version(config, run_id, record.version, version_tags(ws, record.version))


# ---- removals (the forget flow) -----------------------------------------------------------------

@step_task(name="forget-concept")
def forget_concept(ws: Workspace, name: str) -> dict:
    """``cns.forget.forget`` on the workspace's model: the new lineage without ``name`` in
    ``data/model`` (not yet committed); returns the removal record."""
    from cns.forget import forget

    drop_model(ws)  # the in-memory model still holds the concept
    return forget(ws.model_dir, name)


@task(name="start-forget-run", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def start_forget_run(config: Config, removal: dict) -> str:
    return tracking.start_forget_run(config, removal=removal)


@task(name="log-forget-run", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def log_forget_run(ws: Workspace, config: Config, run_id: str, removal: dict, evaluation: ModelEvaluation) -> None:
    """The removal's run: the remaining concepts' metrics and samples at the new version, the
    forgetting history, the removal record and the new lineage."""
    import json

    from tasks import serving

    tracking.log_metrics(run_id, {**evaluation.flat_metrics(),
                                  "removal/rows_kept_by_later_concepts": removal["rows_kept_by_later_concepts"],
                                  "removal/concepts_left": len(read_lineage(ws.model_dir).concepts)})
    with tempfile.TemporaryDirectory(prefix="cns-artifacts-") as tmp:
        out = Path(tmp)
        if evaluation.metrics and (ws.metrics_dir / "forgetting.csv").exists():
            review_artifacts(out, evaluation, ws.metrics_dir, config, title=f"output change (v{removal['version']}: "
                                                                              f"forgot {removal['name']})")
            tracking.log_sample_images(run_id, {n: out / "samples" / f"{n}.png" for n in evaluation.samples},
                                       removal["version"])
        serving.save_model(ws.model_dir, out / "model", config)  # the registry version's MLflow model
        (out / "model" / "removal.json").write_text(json.dumps(removal, indent=2))
        (out / "model" / "README.md").write_text(
            f"Model version {removal['version']}: {removal['name']} ({removal['token']}) removed. The weights are "
            f"versioned with DVC: in the workspace, `git checkout {versioning.TAG_PREFIX}{removal['version']} && "
            f"dvc pull`; `{versioning.TAG_PREFIX}{removal['version'] - 1}` still holds the concept.\n")
        tracking.log_artifacts(run_id, {p.name: p for p in out.iterdir()})


@task(name="version-removal", retries=2, retry_delay_seconds=5, retry_condition_fn=_unless_conflict,
      cache_policy=NO_CACHE)
def version_removal(ws: Workspace, removal: dict, run_id: str) -> dict[str, str]:
    """dvc add + push of the model (the removed concept's dataset stays as it is), then git commit
    "model vN: forget <concept>" + tag ``model-vN`` (idempotent)."""
    versioning.add_and_push(ws, None)
    versioned = versioning.commit_and_tag(ws, ConceptRecord(**removal["record"]), action="forget",
                                          version=removal["version"])
    _publish(ws, run_id, removal["version"], versioned)
    return versioned


@task(name="register-removal", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def register_removal(ws: Workspace, config: Config, run_id: str, removal: dict, versioned: dict[str, str]) -> str:
    tracking.set_tags(run_id, {"cns.git_tag": versioned["tag"], "cns.workspace_commit": versioned["commit"],
                               "cns.dvc_hash": versioned["dvc_hash"]})
    return tracking.register_version(config, run_id, removal["version"], version_tags(ws, removal["version"]))


@task(name="find-removal-requests", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def find_removal_requests() -> list[tuple[str, str]]:
    """``forget/<concept>`` objects in the bucket, oldest first: (concept, key)."""
    return bucket.removal_requests(s3.client(), s3.bucket_name())


@task(name="close-removal-request", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def close_removal_request(key: str) -> None:
    bucket.close_removal_request(s3.client(), s3.bucket_name(), key)
