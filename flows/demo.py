"""The main job on one machine (``bash scripts/demo.sh``): start the embedded stack, drop two sample
concepts into the bucket, let the flows learn them into one model, run the nightly re-check, then
say where everything is.

Each run uses a new workspace (``outputs/demo/workspace``), a new bucket and a new MLflow model
name, so it never mixes with an earlier run; the stack (``.stack/``) is reused if it is up.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from datetime import datetime, timezone

import yaml

from tasks.versioning import PROJECT_ROOT

OUT = PROJECT_ROOT / "outputs" / "demo"
SAMPLES = PROJECT_ROOT / "data" / "samples"
CONCEPTS = ("dog", "cat2")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    from tasks import bucket, s3, stack

    start = time.perf_counter()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    say("starting the local stack (SeaweedFS, MLflow, Prefect) on 127.0.0.1")
    config = stack.StackConfig.resolve()
    _, creds = stack.up(config)
    os.environ.update(stack.client_env(config, creds, with_secret=True))
    os.environ["CNS_BUCKET"] = f"demo-{stamp}"
    client = s3.client()
    client.create_bucket(Bucket=os.environ["CNS_BUCKET"])

    say(f"creating the workspace {OUT / 'workspace'} (git + DVC, remote s3://{os.environ['CNS_BUCKET']}/dvc)")
    from tasks.versioning import git, init_workspace

    if OUT.exists():
        shutil.rmtree(OUT)
    ws = init_workspace(OUT / "workspace")
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    params["pipeline"]["model_name"] = f"demo-{stamp}"
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    for name in CONCEPTS:
        concept, digest = bucket.drop(client, os.environ["CNS_BUCKET"], SAMPLES / name)
        print(f"dropped {name} -> s3://{os.environ['CNS_BUCKET']}/incoming/{concept}/ (hash {digest[:12]})")

    time.sleep(bucket.settle_seconds())  # a dataset is ready once its newest object is this old (docs/bucket.md)
    say("running the watch flow: learn every pending dataset into one model")
    from flows.pipeline import nightly, watch

    for outcome in watch(str(ws.root)):
        print(f"{outcome['concept']}: {outcome['outcome']}, model v{outcome.get('version')}")
    say("running the nightly flow: re-check every concept, log the forgetting report")
    report = nightly(str(ws.root))

    say("samples from the final model (both concepts, alone and together)")
    from cns.config import GenerateConfig
    from cns.cumulative import open_model
    from cns.generate import generate, grid, save_images
    from cns.info import format_table, info

    cumulative = open_model(ws.model_dir, ws.config())
    prompts = ["a photo of a <dog1> dog", "a photo of a <cat2> cat", "a <dog1> dog and a <cat2> cat on a sofa"]
    images = generate(cumulative.model, prompts, GenerateConfig(num_images_per_prompt=2), progress=False)
    save_images(images, prompts, OUT / "samples")
    grid(images).save(OUT / "samples" / "grid.png")
    print(format_table(*info(ws.model_dir)))

    from mlflow import MlflowClient

    experiment = MlflowClient().get_experiment_by_name(params["pipeline"]["model_name"])
    say(f"done in {time.perf_counter() - start:.0f} s")
    print(f"model versions:  {' '.join(git(ws, 'tag', '--list', 'model-v*').split())} "
          f"(git -C {ws.root} log --oneline; restore: git checkout model-vN && dvc pull)")
    print(f"MLflow:          {config.mlflow_url}/#/experiments/{experiment.experiment_id} "
          f"(runs, neurons, samples, forgetting; nightly run {report['run_id'][:8]}), "
          f"registry: {config.mlflow_url}/#/models/{params['pipeline']['model_name']}")
    print(f"Prefect:         {config.prefect_api_url.removesuffix('/api')} (flow runs watch and nightly)")
    print(f"samples:         {OUT / 'samples'} (grid.png); per-version metrics: {ws.metrics_dir}")
    print("stop the servers: .venv/bin/cns stack down")
    return 0


if __name__ == "__main__":
    from cns.errors import CNSError

    try:
        sys.exit(main())
    except CNSError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        sys.exit(2)
