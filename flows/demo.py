"""The main job on one machine (``bash scripts/demo.sh``): start the embedded stack, drop three
benchmark-world concepts into the bucket, let the flows learn them into one model on the
pretrained world model, run the nightly re-check, draw each concept before and after, then say
where everything is.

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
WORLD = PROJECT_ROOT / "data" / "world"
# Benchmark-world concepts (rendered by `cns world concepts`): glyphs the pretrained world model
# has never drawn, so what the samples show after learning was learned.
CONCEPTS = ("ringdot", "checker", "arrow")
PROMPT = "a {token} glyph on a gray background"


# Rates and steps of the demo's CNS runs (the benchmark tunes its own): on the world model, 25% of
# each layer's rows learn plusdot to identity 0.71 in 1600 steps at 3e-3, and to 0.33 (with more
# drift) in 800 steps at 1e-2 (docs/world/cns-probe-2026-11-27).
DEMO_TRAIN = {"max_train_steps": 1600, "learning_rate": 3e-3, "token_learning_rate": 5e-2}


def world_settings(params: dict) -> dict:
    """The workspace's settings for the world model: its own calibration captions, 32 px, no
    flips (a glyph is not mirror-symmetric), the sampler the benchmark uses, and the CNS settings
    of the benchmark world (data/world/params.yaml ``bench.cns`` and ``bench.base_ratio``)."""
    from world.bench import world_calibration_prompts
    from world.params import bench_settings

    bench = bench_settings()
    for section, values in bench.cns.items():
        params[section].update(values)
    params["scoring"]["base_ratio"] = bench.base_ratio
    params["model"].update(pretrained_model_name_or_path=str(WORLD / "model"), mixed_precision="no")
    params["calibration"]["prompts_file"] = str(world_calibration_prompts(OUT / "calibration.txt"))
    params["train"].update(train_batch_size=4, random_flip=False, **DEMO_TRAIN)
    sampler = {"num_inference_steps": 20, "guidance_scale": 3.0}
    params["evaluate"].update(prompts=[PROMPT.replace("{token} glyph", "{token} {class_noun}")], **sampler)
    params["generate"].update(region_base=bench.region_base, **sampler)  # the world's share (docs/world/regions-base-2026-11-28)
    return params


def concept_tokens() -> list[str]:
    return [yaml.safe_load((WORLD / "concepts" / name / "concept.yaml").read_text())["token"] for name in CONCEPTS]


def before_and_after(learned, config, path) -> list[str]:
    """One row per concept: a training photo, the base model's sample of the concept's prompt,
    and two samples of the ``learned`` model (the same seeds as the base model's)."""
    from PIL import Image

    from cns.generate import sample_pixels
    from cns.models import load_pretrained

    base = load_pretrained(config.model.pretrained_model_name_or_path)
    rows, prompts = [], []
    for k, (name, token) in enumerate(zip(CONCEPTS, concept_tokens())):
        prompt = PROMPT.format(token=token)
        prompts.append(prompt)
        seeds = [100 + 10 * k, 101 + 10 * k]
        before = sample_pixels(base, [prompt], seeds[:1], num_inference_steps=20, guidance_scale=3.0)
        after = sample_pixels(learned, [prompt] * 2, seeds, num_inference_steps=20, guidance_scale=3.0)
        rows.append([Image.open(WORLD / "concepts" / name / "00.png").convert("RGB"),
                     *[Image.fromarray(a) for a in before.numpy()], *[Image.fromarray(a) for a in after.numpy()]])
    save_labelled(rows, ("training photo", "base model", "learned", "learned"), path)
    return prompts


def save_labelled(rows, labels, path) -> None:
    """The rows of images as one grid of 96 px cells, a label over each column."""
    from PIL import Image, ImageDraw

    from cns.generate import grid

    canvas = grid(rows, cell=96)
    labelled = Image.new("RGB", (canvas.width, canvas.height + 18), "white")
    labelled.paste(canvas, (0, 18))
    draw = ImageDraw.Draw(labelled)
    for i, label in enumerate(labels):
        draw.text((96 * i + 4, 3), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled.save(path)


def together(learned, config, path) -> list[str]:
    """Each concept with the next in one image, "a <a> glyph and a <b> glyph on a gray background":
    two samples of the plain prompt, then the same seeds with region control (each concept's own
    caption in its half, the global prompt's ``generate.region_base`` share beside it)."""
    from PIL import Image

    from cns.generate import sample_pixels
    from cns.regions import NAMED

    tokens = concept_tokens()
    rows, prompts = [], []
    for k, (a, b) in enumerate(zip(tokens, tokens[1:] + tokens[:1])):
        prompt = f"a {a} glyph and a {b} glyph on a gray background"
        prompts.append(prompt)
        halves = [(NAMED["left"], PROMPT.format(token=a)), (NAMED["right"], PROMPT.format(token=b))]
        seeds = [200 + 10 * k, 201 + 10 * k]
        kwargs = {"num_inference_steps": config.generate.num_inference_steps,
                  "guidance_scale": config.generate.guidance_scale}
        plain = sample_pixels(learned, [prompt] * 2, seeds, **kwargs)
        placed = sample_pixels(learned, [prompt] * 2, seeds, regions=halves, region_base=config.generate.region_base,
                               **kwargs)
        rows.append([Image.fromarray(x) for x in [*plain.numpy(), *placed.numpy()]])
    save_labelled(rows, ("plain prompt", "plain prompt", "regions", "regions"), path)
    return prompts


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
    (ws.root / "params.yaml").write_text(yaml.safe_dump(world_settings(params), sort_keys=False))

    for name in CONCEPTS:
        concept, digest = bucket.drop(client, os.environ["CNS_BUCKET"], WORLD / "concepts" / name)
        print(f"dropped {name} -> s3://{os.environ['CNS_BUCKET']}/incoming/{concept}/ (hash {digest[:12]})")

    time.sleep(bucket.settle_seconds())  # a dataset is ready once its newest object is this old (docs/bucket.md)
    say("running the watch flow: learn every pending dataset into one model")
    from flows.pipeline import nightly, watch

    for outcome in watch(str(ws.root)):
        print(f"{outcome['concept']}: {outcome['outcome']}, model v{outcome.get('version')}")
    say("running the nightly flow: re-check every concept, log the forgetting report")
    report = nightly(str(ws.root))

    say("each concept before and after learning (training photo | base model | learned model)")
    from cns.cumulative import open_model
    from cns.info import format_table, info

    settings = ws.config()
    learned = open_model(ws.model_dir, settings).model
    prompts = before_and_after(learned, settings, OUT / "samples" / "grid.png")
    print("\n".join(f"row {k + 1}: {p}" for k, p in enumerate(prompts)))
    print(format_table(*info(ws.model_dir)))
    say("two concepts in one image (left | right), the prompt alone and with region control")
    pairs = together(learned, settings, OUT / "samples" / "together.png")
    print("\n".join(f"row {k + 1}: {p}" for k, p in enumerate(pairs)))

    from mlflow import MlflowClient

    experiment = MlflowClient().get_experiment_by_name(params["pipeline"]["model_name"])
    say(f"done in {time.perf_counter() - start:.0f} s")
    print(f"model versions:  {' '.join(git(ws, 'tag', '--list', 'model-v*').split())} "
          f"(git -C {ws.root} log --oneline; restore: git checkout model-vN && dvc pull)")
    from tasks.tracking import runs_url

    print(f"MLflow:          {runs_url(experiment.experiment_id)} "
          f"(runs, neurons, samples, forgetting; nightly run {report['run_id'][:8]}), "
          f"registry: {config.mlflow_url}/#/models/{params['pipeline']['model_name']}")
    # the browser asks for the stack's MLflow login; never print the password (logs, scrollback)
    print(f"MLflow login:    user {os.environ.get('MLFLOW_TRACKING_USERNAME', '-')}, password in "
          f"{config.root / stack.MLFLOW_AUTH_FILE} (.venv/bin/cns stack env prints both)")
    print(f"Prefect:         {config.prefect_api_url.removesuffix('/api')} (flow runs watch and nightly; "
          f"the browser asks for the auth string in {config.root / stack.PREFECT_AUTH_FILE})")
    print(f"samples:         {OUT / 'samples'} (grid.png, together.png); per-version metrics: {ws.metrics_dir}")
    print("stop the servers: .venv/bin/cns stack down")
    return 0


if __name__ == "__main__":
    from cns.errors import CNSError

    try:
        sys.exit(main())
    except CNSError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        sys.exit(2)
