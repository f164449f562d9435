"""A model version as an MLflow model: a pyfunc that loads the base model plus the lineage's deltas.

Each registry version's source (``runs:/<run>/model``) is written by :func:`save_model`. Its
artifacts are the small part of the model, ``lineage.json`` and one ``delta.safetensors`` per
concept (docs/model_format.md); the base model is not copied: it is named by path or hub id, as
the lineage names it, and checked against the lineage's weights hash when the model loads
(cns.cumulative.open_model refuses any other base). A serving machine whose base lives elsewhere
passes ``model_config={"pretrained_model_name_or_path": ...}`` to ``mlflow.pyfunc.load_model``.

Input: a column ``prompt`` (one row per prompt); params ``seed``, ``num_inference_steps``,
``num_images_per_prompt``, ``guidance_scale``, ``region_base`` (defaults: the workspace's ``generate``
section) and ``regions``, a list of ``BOX=PROMPT`` strings as ``cns generate --region`` takes them
(region control, cns.regions; empty: none), for every prompt of the request.
Output: one row per image, ``prompt``, ``image_index`` and ``image`` (a base64 PNG), which
``mlflow models serve`` returns as JSON (README, "Serving a version").

The model holds no pickle: MLflow runs ``tasks/serving_model.py`` (copied into the model) to get
the class, which comes from the installed package, so ``mlflow models serve --env-manager local``
runs in the project's environment (with its ``bin`` on PATH: the server is its ``uvicorn``).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from cns.config import Config, GenerateConfig, config_from_dict
from cns.errors import CNSError
from cns.lineage import LINEAGE, read_lineage

ARTIFACT = "model_dir"
# Models from code: MLflow copies this file into the model and runs it to get the CNSModel.
MODEL_CODE = Path(__file__).with_name("serving_model.py")
# What a served version needs besides this project (pip names; the versions installed here).
REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "numpy", "pandas", "pillow", "pyyaml", "mlflow")
INT_PARAMS = ("seed", "num_inference_steps", "num_images_per_prompt")


def _signature(defaults: dict):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = [ParamSpec(name, "long", int(defaults[name])) for name in INT_PARAMS]
    params.append(ParamSpec("guidance_scale", "double", float(defaults["guidance_scale"])))
    params.append(ParamSpec("region_base", "double", float(defaults.get("region_base", 0.0))))
    params.append(ParamSpec("regions", "string", [], shape=(-1,)))
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                          outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "image_index"),
                                          ColSpec("string", "image")]),
                          params=ParamSchema(params))


def _requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def serving_config(config: Config, lineage_base: dict) -> dict:
    """The model_config stored in the MLmodel file: the base reference and hash, the device and
    the default generation settings. Nothing from the environment (no endpoint, no credential)."""
    gen = config.generate
    return {"pretrained_model_name_or_path": lineage_base["pretrained_model_name_or_path"],
            "revision": lineage_base.get("revision"), "base_hash": lineage_base["hash"],
            "device": config.model.device, "seed": gen.seed, "num_inference_steps": gen.num_inference_steps,
            "num_images_per_prompt": 1, "guidance_scale": gen.guidance_scale, "region_base": gen.region_base}


def save_model(model_dir: str | Path, path: str | Path, config: Config) -> Path:
    """Write model ``model_dir`` (its lineage and the deltas it applies) as an MLflow pyfunc
    model directory ``path``; ``lineage.json`` is also kept at its top for a reader of the run."""
    model_dir, path = Path(model_dir), Path(path)
    lineage = read_lineage(model_dir)
    if lineage is None:
        raise CNSError(model_dir, "holds no lineage.json: nothing to save as a model", "model_missing")
    defaults = serving_config(config, lineage.base)
    with tempfile.TemporaryDirectory(prefix="cns-pyfunc-") as tmp:
        files = Path(tmp) / ARTIFACT
        files.mkdir()
        shutil.copy(model_dir / LINEAGE, files / LINEAGE)
        for record in lineage.concepts:  # removed concepts' files stay behind: they no longer apply
            (files / record.delta).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(model_dir / record.delta, files / record.delta)
        # An input example would make MLflow load the model and generate while saving it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            mlflow.pyfunc.save_model(
                str(path), python_model=str(MODEL_CODE), artifacts={ARTIFACT: str(files)}, signature=_signature(defaults),
                model_config=defaults, pip_requirements=_requirements(),
                metadata={"cns.model_version": lineage.version, "cns.concepts": [c.name for c in lineage.concepts],
                          "cns.tokens": [c.token for c in lineage.concepts],
                          "cns.base": {k: lineage.base.get(k) for k in ("pretrained_model_name_or_path", "revision",
                                                                         "hash")}})
    shutil.copy(model_dir / LINEAGE, path / LINEAGE)
    return path


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _prompts(model_input) -> list[str]:
    """The prompts of a request: a DataFrame's ``prompt`` column (how the scoring server passes
    ``dataframe_records``/``inputs``), a list of strings, or one string."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        if "prompt" not in model_input.columns:
            raise CNSError("input", f"needs a column 'prompt', got {list(model_input.columns)}", "prompt_missing")
        return [str(p) for p in model_input["prompt"]]
    if isinstance(model_input, dict):
        prompts = model_input.get("prompt")
        return [prompts] if isinstance(prompts, str) else [str(p) for p in prompts or []]
    return [str(p) for p in model_input]


def _invalid(exc: Exception):
    """An MlflowException the scoring server answers with 400 and the message, not a 500."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE)


class CNSModel(mlflow.pyfunc.PythonModel):
    """The cumulative model behind ``mlflow.pyfunc``: base + deltas, loaded once per process."""

    def load_context(self, context) -> None:
        from cns.cumulative import open_model

        settings = dict(context.model_config or {})
        model_dir = Path(context.artifacts[ARTIFACT])
        lineage = json.loads((model_dir / LINEAGE).read_text())
        wanted = settings.get("pretrained_model_name_or_path") or lineage["base"]["pretrained_model_name_or_path"]
        if wanted != lineage["base"]["pretrained_model_name_or_path"]:
            # The same base at another place: the lineage names where it was learned, the hash
            # (checked by open_model) says it is the same weights.
            copy = Path(tempfile.mkdtemp(prefix="cns-served-"))
            shutil.copytree(model_dir, copy, dirs_exist_ok=True)
            lineage["base"]["pretrained_model_name_or_path"] = wanted
            (copy / LINEAGE).write_text(json.dumps(lineage, indent=2))
            model_dir = copy
        config = config_from_dict({"model": {"pretrained_model_name_or_path": wanted,
                                             "revision": settings.get("revision", lineage["base"].get("revision")),
                                             "device": settings.get("device", "auto")}}, source="model_config")
        self.cumulative = open_model(model_dir, config)
        self.defaults = {k: settings[k] for k in (*INT_PARAMS, "guidance_scale", "region_base") if k in settings}

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from cns.generate import generate
        from cns.regions import check_base, parse_region

        chosen = {**GenerateConfig(num_images_per_prompt=1).__dict__, **self.defaults, **(params or {})}
        try:
            gen = GenerateConfig(**{k: int(chosen[k]) for k in INT_PARAMS},
                                 guidance_scale=float(chosen["guidance_scale"]), region_base=float(chosen["region_base"]))
            if gen.num_inference_steps < 1 or gen.num_images_per_prompt < 1:
                raise CNSError("params", "num_inference_steps and num_images_per_prompt must be >= 1", "params_invalid")
            check_base(gen.region_base, "params.region_base")
            raw = chosen.get("regions")
            raw = [] if raw is None else [raw] if isinstance(raw, str) else list(raw)
            regions = [parse_region(str(text), "params.regions") for text in raw]
            prompts = _prompts(model_input)
            images = generate(self.cumulative.model, prompts, gen, progress=False, regions=regions)
        except CNSError as exc:
            raise _invalid(exc) from exc
        return pd.DataFrame([{"prompt": prompt, "image_index": j, "image": _png_base64(image)}
                             for prompt, row in zip(prompts, images) for j, image in enumerate(row)],
                            columns=["prompt", "image_index", "image"])
