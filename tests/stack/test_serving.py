"""A model version as MLflow and DVC users fetch it, on the real stack and offline: the registry's
``@current`` loads with ``mlflow.pyfunc`` and serves with ``mlflow models serve``, and
``dvc artifacts get`` fetches any earlier version of the workspace's model."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cns.lineage import read_lineage
from tasks import bucket, s3
from tasks.versioning import git

from stack_helpers import make_concept, own_workspace, token_for

pytestmark = pytest.mark.stack
BIN = Path(sys.executable).parent
FAST = {"train": {"max_train_steps": 10}, "scoring": {"num_score_samples": 4, "score_batch_size": 2},
        "evaluate": {"num_inference_steps": 2, "num_images_per_prompt": 1, "loss_draws": 2}}
CONCEPTS = ("first", "second")
# Target: 30 s from a cold `mlflow models serve` to the first image (issue 11). The wall-clock bound
# is loose because the test shares 2 loaded cores with the stack's servers and other test
# processes; the target is checked on the CPU time the server's processes spent until then (their
# work runs one process after the other, so on an idle machine that is about the wall time).
COLD_SERVE_BOUND = 180.0
COLD_SERVE_TARGET = 30.0


@pytest.fixture(scope="module")
def versions(running_stack, tmp_path_factory):
    """Two concepts learned by one watch pass into a workspace of their own: model v1 and v2,
    registry versions 1 and 2 (alias current on 2). Yields (workspace, model name)."""
    from flows.pipeline import watch

    with own_workspace(tmp_path_factory, "serve", **FAST) as (ws, name, root):
        for seed, concept in enumerate(CONCEPTS):
            bucket.drop(s3.client(), name, make_concept(root / "sources", concept, seed=seed))
        outcomes = watch(str(ws.root))
        assert [o["outcome"] for o in outcomes] == ["learned", "learned"]
        yield ws, name


def _decode(text: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def _prompt() -> str:
    return f"a {token_for(CONCEPTS[0])} thing next to a {token_for(CONCEPTS[1])} thing"


def test_the_current_registry_version_loads_with_mlflow_pyfunc_and_generates_an_image(versions):
    import mlflow
    import pandas as pd

    _, name = versions
    model = mlflow.pyfunc.load_model(f"models:/{name}@current")
    assert model.metadata.metadata["cns.model_version"] == 2
    assert model.metadata.metadata["cns.concepts"] == list(CONCEPTS)
    out = model.predict(pd.DataFrame({"prompt": [_prompt()]}), params={"num_inference_steps": 2, "seed": 5})
    assert len(out) == 1 and _decode(out["image"][0]).shape == (64, 64, 3)


def test_the_registered_model_holds_the_deltas_and_no_base_weights_or_credentials(versions, tmp_path):
    import mlflow

    _, name = versions
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@current", dst_path=str(tmp_path)))
    files = [p for p in local.rglob("*") if p.is_file()]
    names = {p.relative_to(local).as_posix() for p in files}
    assert {"MLmodel", "lineage.json", "artifacts/model_dir/lineage.json"} <= names
    assert {f"artifacts/model_dir/concepts/{c}/delta.safetensors" for c in CONCEPTS} <= names
    assert sum(p.stat().st_size for p in files) < 2_000_000  # the tiny base alone is larger
    blob = b"".join(p.read_bytes() for p in files)
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]):
        assert secret.encode() not in blob


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_seconds(group: int) -> float:
    """CPU time (user + system, with reaped children) of the processes in process group ``group``."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group:
                ticks += sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_answers_an_invocation_with_images_from_a_cold_start(versions, tmp_path):
    import mlflow
    import pandas as pd

    _, name = versions
    port = _free_port()
    # region control through JSON too: a list param (the first concept alone in the left half)
    body = {"dataframe_records": [{"prompt": _prompt()}],
            "params": {"num_inference_steps": 2, "seed": 7, "regions": [f"left=a {token_for(CONCEPTS[0])} thing"],
                       "region_base": 0.5}}
    import torch

    log = (tmp_path / "serve.log").open("w")
    start = time.monotonic()
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@current",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              # The server runs `uvicorn` from PATH: the venv is active, as a user's would be.
                              # ... with this process's torch thread count, so both run the same kernels.
                              env=dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                       OMP_NUM_THREADS=str(torch.get_num_threads())),
                              stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        answer = None
        while answer is None:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() - start < COLD_SERVE_BOUND, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                answer = _post(f"http://127.0.0.1:{port}/invocations", body, timeout=120)
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.25)
        seconds, cpu = time.monotonic() - start, _cpu_seconds(server.pid)
        print(f"\ncold `mlflow models serve` to the first image: {seconds:.1f} s ({cpu:.1f} s of CPU)")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        log.close()
    assert cpu <= COLD_SERVE_TARGET
    (row,) = answer["predictions"]
    assert row["prompt"] == _prompt() and row["image_index"] == 0
    served = _decode(row["image"])
    assert served.shape == (64, 64, 3)
    # The server's image is the one the same version gives in this process for the same request.
    here = mlflow.pyfunc.load_model(f"models:/{name}@current").predict(
        pd.DataFrame({"prompt": [_prompt()]}), params=body["params"])
    # (Bit for bit where the kernels match; allow float noise of under one grey level on average,
    # far below the ~30-60 levels between images of another prompt or seed.)
    import numpy as np

    assert np.abs(served.astype(np.int16) - _decode(here["image"][0]).astype(np.int16)).mean() < 1.0


def test_dvc_artifacts_get_fetches_model_v1_after_v2_exists(versions, tmp_path):
    ws, _ = versions
    assert git(ws, "tag", "--list", "model@*").split() == ["model@v1.0.0", "model@v2.0.0"]
    endpoint = ["--remote-config", f"endpointurl={s3.endpoint_url()}"] if s3.endpoint_url() else []
    fetched = {}
    for rev in ("v1.0.0", None):
        out = tmp_path / (rev or "newest")
        subprocess.run([str(BIN / "dvc"), "artifacts", "get", str(ws.root), "model", "-o", str(out), "-q",
                        *(["--rev", rev] if rev else []), *endpoint], check=True, timeout=300)
        fetched[rev] = read_lineage(out)
    assert [c.name for c in fetched["v1.0.0"].concepts] == [CONCEPTS[0]]
    assert [c.name for c in fetched[None].concepts] == list(CONCEPTS)
    v1 = tmp_path / "v1.0.0"
    for path in (v1 / "concepts").rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (ws.model_dir / path.relative_to(v1)).read_bytes()
