"""Reading a generated image back into the world's terms: background, object colour, identity.

Background and colour are exact rules on the palette (the generator knows every colour):
the background is the median of the 2-pixel border, the object colour the median of the pixels
far from it, each snapped to the nearest palette entry. Identity (which base shape or concept)
comes from a small CNN trained on the generator's own renders, with noise and blur so it also
reads imperfect samples; its accuracy on fresh renders is measured and stored next to its
weights (judge.json), and reported with every benchmark.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cns.errors import CNSError
from world.scene import BACKGROUNDS, COLORS, SHAPES, Obj, WorldConcept, place, render

JUDGE_DIR = Path(__file__).resolve().parent.parent / "data" / "world" / "judge"
FAR_FROM_BACKGROUND = 70.0  # RGB distance: pixels farther than this from the background are object

_BG = np.array(list(BACKGROUNDS.values()), np.float32)
_FG = np.array(list(COLORS.values()), np.float32)


def read_background(image: np.ndarray) -> str:
    """image uint8 (h, w, 3) -> background name."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]).astype(np.float32)
    rgb = np.median(border, axis=0)
    return list(BACKGROUNDS)[int(np.argmin(((_BG - rgb) ** 2).sum(1)))]


def read_color(image: np.ndarray, background: str | None = None) -> str | None:
    """The dominant object colour, or None when (almost) nothing differs from the background."""
    background = background or read_background(image)
    pixels = image.reshape(-1, 3).astype(np.float32)
    far = np.sqrt(((pixels - np.asarray(BACKGROUNDS[background], np.float32)) ** 2).sum(1)) > FAR_FROM_BACKGROUND
    if far.sum() < 4:
        return None
    # Snap each object pixel, then take the most common colour (robust to anti-aliased edges).
    snapped = np.argmin(((pixels[far][:, None] - _FG[None]) ** 2).sum(-1), axis=1)
    return list(COLORS)[int(np.bincount(snapped, minlength=len(COLORS)).argmax())]


def halves(image: np.ndarray, count: int = 2) -> list[np.ndarray]:
    """Each of ``count`` vertical strips, centred on a full-size canvas of its background colour."""
    width = image.shape[1] // count
    out = []
    for k in range(count):
        strip = image[:, k * width:(k + 1) * width]
        canvas = np.empty_like(image)
        canvas[:] = np.median(np.concatenate([strip[:2].reshape(-1, 3), strip[-2:].reshape(-1, 3)]), axis=0)
        left = (image.shape[1] - width) // 2
        canvas[:, left:left + width] = strip
        out.append(canvas)
    return out


class IdentityNet(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
            nn.Conv2d(64, 96, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(96, 96, 3, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(96 * 2, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _degrade(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Noise, blur and slight colour shifts: what an imperfect sample looks like."""
    n = len(x)
    sigma = torch.from_numpy(rng.uniform(0, 0.25, (n, 1, 1, 1))).float()
    x = x + sigma * torch.from_numpy(rng.standard_normal(x.shape)).float()
    blur = rng.random(n) < 0.4
    if blur.any():
        k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32) / 16
        blurred = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        x[blur] = blurred
    x = x + torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 3, 1, 1))).float()
    return x.clamp(-1.2, 1.2)


def random_identity_scene(rng: np.random.Generator, classes: list[str], concepts: dict[str, WorldConcept]):
    label = int(rng.integers(len(classes)))
    name = classes[label]
    obj = Obj(concept=concepts[name]) if name in concepts else Obj(name, list(COLORS)[int(rng.integers(len(COLORS)))])
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    if rng.random() < 0.35:  # one half of a two-object scene, as read_pair sees it
        other = Obj(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))])
        side = int(rng.integers(2))
        scene = place([obj, other] if side == 0 else [other, obj], background, rng)
        return halves(render(scene))[side], label
    return render(place([obj], background, rng)), label


@dataclass
class Judge:
    net: IdentityNet
    classes: list[str]
    record: dict

    @torch.no_grad()
    def identities(self, images: np.ndarray | torch.Tensor) -> list[str]:
        images = images.numpy() if torch.is_tensor(images) else images
        out = []
        for chunk in np.array_split(images, max(1, len(images) // 512 + 1)):
            if len(chunk):
                out += [self.classes[i] for i in self.net(_to_input(chunk)).argmax(1).tolist()]
        return out

    @torch.no_grad()
    def embeddings(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Unit-length judge features (the analogue of DINO features for image similarity)."""
        images = images.numpy() if torch.is_tensor(images) else images
        return F.normalize(torch.cat([self.net.embed(_to_input(c)) for c in np.array_split(
            images, max(1, len(images) // 512 + 1)) if len(c)]), dim=1)

    def read(self, images: np.ndarray | torch.Tensor) -> list[dict]:
        """Per image: background, colour, identity."""
        images = images.numpy() if torch.is_tensor(images) else images
        ids = self.identities(images)
        out = []
        for image, identity in zip(images, ids):
            bg = read_background(image)
            out.append({"background": bg, "color": read_color(image, bg), "identity": identity})
        return out

    def read_pair(self, images: np.ndarray | torch.Tensor) -> list[tuple[dict, dict]]:
        """Two-object images: (left object, right object), each with the image's background."""
        images = images.numpy() if torch.is_tensor(images) else images
        split = [h for image in images for h in halves(image)]
        reads = self.read(np.stack(split)) if split else []
        bgs = [read_background(image) for image in images]
        pairs = []
        for i, bg in enumerate(bgs):
            left, right = reads[2 * i], reads[2 * i + 1]
            left["background"] = right["background"] = bg
            pairs.append((left, right))
        return pairs


def train_judge(concepts: list[WorldConcept], out_dir: str | Path = JUDGE_DIR, steps: int = 500,
                batch_size: int = 64, seed: int = 0, device: str = "cpu", progress: bool = True) -> Judge:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes = list(SHAPES) + [c.name for c in concepts]
    by_name = {c.name: c for c in concepts}
    net = IdentityNet(len(classes)).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="judge", disable=not progress, mininterval=5):
        batch = [random_identity_scene(rng, classes, by_name) for _ in range(batch_size)]
        x = _degrade(_to_input(np.stack([b[0] for b in batch])), rng)
        y = torch.tensor([b[1] for b in batch])
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval().to("cpu")
    judge = Judge(net, classes, {})
    judge.record = {"classes": classes, "train_steps": steps, "train_seconds": round(time.perf_counter() - start, 1),
                    "validation": validate(judge, concepts, seed=seed + 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / "judge.safetensors"))
    (out_dir / "judge.json").write_text(json.dumps(judge.record, indent=2) + "\n")
    return judge


@torch.no_grad()
def validate(judge: Judge, concepts: list[WorldConcept], n: int = 3000, seed: int = 1) -> dict:
    """Accuracy of every reading on fresh renders the judge never saw: clean, and degraded."""
    rng = np.random.default_rng(seed)
    by_name = {c.name: c for c in concepts}
    images, labels, scenes = [], [], []
    for _ in range(n):
        label = int(rng.integers(len(judge.classes)))
        name = judge.classes[label]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        obj = Obj(concept=by_name[name]) if name in by_name else Obj(name, color)
        scene = place([obj], list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))], rng)
        images.append(render(scene))
        labels.append(name)
        scenes.append(scene)
    images = np.stack(images)
    degraded = ((_degrade(_to_input(images), rng).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    out = {"renders": n}
    for tag, batch in (("clean", images), ("degraded", degraded)):
        reads = judge.read(batch)
        out[f"identity_{tag}"] = float(np.mean([r["identity"] == y for r, y in zip(reads, labels)]))
        out[f"background_{tag}"] = float(np.mean([r["background"] == s.background for r, s in zip(reads, scenes)]))
        shapes = [(r, s) for r, s in zip(reads, scenes) if s.objects[0].concept is None]
        out[f"color_{tag}"] = float(np.mean([r["color"] == s.objects[0].color for r, s in shapes]))
    # Two-object scenes, read by halves.
    pairs, truth = [], []
    for _ in range(n // 3):
        objs = [Obj(s, list(COLORS)[int(rng.integers(len(COLORS)))]) for s in rng.choice(list(SHAPES), 2)]
        scene = place(objs, list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))], rng)
        pairs.append(render(scene))
        truth.append(objs)
    reads = judge.read_pair(np.stack(pairs))
    out["two_object_identity_clean"] = float(np.mean([
        lr[0]["identity"] == t[0].shape and lr[1]["identity"] == t[1].shape for lr, t in zip(reads, truth)]))
    out["two_object_color_clean"] = float(np.mean([
        lr[0]["color"] == t[0].color and lr[1]["color"] == t[1].color for lr, t in zip(reads, truth)]))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def load_judge(directory: str | Path = JUDGE_DIR) -> Judge:
    directory = Path(directory)
    meta, weights = directory / "judge.json", directory / "judge.safetensors"
    for path in (meta, weights):
        if not path.is_file():
            raise CNSError(path, "missing: train the judge with `cns world judge`", "world_missing")
    record = json.loads(meta.read_text())
    net = IdentityNet(len(record["classes"]))
    net.load_state_dict(load_file(str(weights)))
    net.eval()
    return Judge(net, record["classes"], record)
