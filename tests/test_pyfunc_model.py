"""A model directory saved as an MLflow pyfunc (tasks.serving) loads as base + deltas and returns
the images the library generates, as base64 PNGs; its artifacts are the lineage and deltas only."""

from __future__ import annotations

import base64
import io

import pytest

import cns_testing  # noqa: F401  (offline, one torch thread)

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def saved(two_concepts, tmp_path_factory):
    from tasks.serving import save_model

    return save_model(two_concepts.model_dir, tmp_path_factory.mktemp("pyfunc") / "model", two_concepts.config)


def _decode(text: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def test_the_saved_model_holds_the_lineage_and_deltas_but_not_the_base(saved, two_concepts):
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert {"MLmodel", "lineage.json", "artifacts/model_dir/lineage.json"} <= files
    for record in two_concepts.records:
        assert f"artifacts/model_dir/{record.delta}" in files
    assert not any(name.endswith(("mask.safetensors", ".bin", ".pkl")) for name in files)  # no base, no pickle
    assert sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()) < 2_000_000


def test_the_pyfunc_returns_the_librarys_images_as_base64_pngs(saved, two_concepts):
    import numpy as np
    import pandas as pd

    from cns.config import GenerateConfig
    from cns.generate import generate

    model = mlflow.pyfunc.load_model(str(saved))
    tokens = [r.token for r in two_concepts.records]
    prompts = [f"a photo of a {tokens[0]} dog", f"a {tokens[1]} cat next to a {tokens[0]} dog"]
    out = model.predict(pd.DataFrame({"prompt": prompts}), params={"seed": 3, "num_inference_steps": 2,
                                                                    "num_images_per_prompt": 2})
    assert list(out.columns) == ["prompt", "image_index", "image"]
    assert list(out["prompt"]) == [prompts[0], prompts[0], prompts[1], prompts[1]]
    expected = generate(two_concepts.cumulative.model, prompts,
                        GenerateConfig(num_inference_steps=2, num_images_per_prompt=2, seed=3,
                                       guidance_scale=two_concepts.config.generate.guidance_scale), progress=False)
    for (_, row), image in zip(out.iterrows(), [im for images in expected for im in images]):
        assert np.array_equal(_decode(row["image"]), np.asarray(image.convert("RGB")))


def test_an_unknown_token_is_a_bad_request_not_a_crash(saved):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(saved))
    with pytest.raises(MlflowException, match="not learned") as caught:
        model.predict(pd.DataFrame({"prompt": ["a photo of a <nobody> dog"]}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_the_pyfunc_takes_regions_as_cns_generate_does_and_a_bad_region_is_a_bad_request(saved, two_concepts):
    import numpy as np
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from cns.config import GenerateConfig
    from cns.generate import generate
    from cns.regions import parse_region

    model = mlflow.pyfunc.load_model(str(saved))
    tokens = [r.token for r in two_concepts.records]
    prompt = f"a {tokens[0]} dog and a {tokens[1]} cat"
    regions = [f"left=a photo of a {tokens[0]} dog", f"right=a photo of a {tokens[1]} cat"]
    params = {"seed": 5, "num_inference_steps": 2, "regions": regions, "region_base": 0.5}
    out = model.predict(pd.DataFrame({"prompt": [prompt]}), params=params)
    gen = GenerateConfig(num_inference_steps=2, num_images_per_prompt=1, seed=5, region_base=0.5,
                         guidance_scale=two_concepts.config.generate.guidance_scale)
    expected = generate(two_concepts.cumulative.model, [prompt], gen, progress=False,
                        regions=[parse_region(r) for r in regions])[0][0]
    assert np.array_equal(_decode(out["image"][0]), np.asarray(expected.convert("RGB")))
    plain = model.predict(pd.DataFrame({"prompt": [prompt]}), params={"seed": 5, "num_inference_steps": 2})
    assert not np.array_equal(_decode(plain["image"][0]), _decode(out["image"][0])), "the regions must show"
    for bad, where in ((["middle=a dog"], "params.regions"), (["left=a <nobody> dog"], "not learned")):
        with pytest.raises(MlflowException, match=where) as caught:
            model.predict(pd.DataFrame({"prompt": [prompt]}), params={"regions": bad, "num_inference_steps": 1})
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
