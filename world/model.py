"""The world's text-to-image model and its pretraining.

Same diffusers/transformers classes as Stable Diffusion (UNet2DConditionModel with
cross-attention, CLIPTextModel with OpenAI's CLIP tokenizer), but in pixel space (no VAE) at
32x32: the UNet denoises RGB directly, so ``cns`` runs on it through its pixel-space path.
v-prediction on a cosine schedule: an earlier probe found colours came right much sooner than
with epsilon prediction. Pretraining draws fresh scenes every step (the generator is the
dataset: base shapes and family glyphs, never a concept), trains UNet and text encoder jointly
and keeps an EMA of the weights. It checkpoints to ``data/world/pretrain`` every few minutes,
stops on a wall-clock budget and resumes from the checkpoint with the same command, on CPU or
GPU; ``export_model`` writes the EMA as the model folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import platform
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cns.diffusion import diffusion_loss, encode_prompts, tokenize
from cns.models import DiffusionModel, clip_tokenizer, save_pixel_model, tiny_clip_config
from cns.errors import CNSError
from world.scene import SIZE, WorldConcept, load_concepts, random_base_scene, render

log = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "world" / "model"
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "data" / "world" / "pretrain"


def world_dirs(width: int) -> tuple[Path, Path]:
    """The pretraining checkpoint and model folders of a world ``width`` wide: data/world/pretrain
    and data/world/model at 64 (the committed model), data/world/pretrain-W and model-W otherwise,
    so a wider world never resumes from, or exports over, another width's files."""
    if width == PretrainConfig.width:
        return CHECKPOINT_DIR, MODEL_DIR
    return CHECKPOINT_DIR.with_name(f"pretrain-{width}"), MODEL_DIR.with_name(f"model-{width}")


def model_dir_for(checkpoint_dir: str | Path) -> Path:
    """Where a checkpoint's model goes by default: the model folder of its width (a checkpoint
    written before the width setting is 64 wide), so a wider world never overwrites data/world/model."""
    saved = Checkpoint(checkpoint_dir)
    return world_dirs(saved.state()["config"].get("width", PretrainConfig.width) if saved.exists()
                      else PretrainConfig.width)[1]


@dataclass
class PretrainConfig:
    """Everything that decides the trained weights (a checkpoint resumes only under the same)."""

    # 24,000 steps of 16 = 384 k scenes, 4.8x the first world's 80 k, which was still learning
    # shapes (0.60 on seen pairs). 0.6-0.9 s a step on one CPU thread: 4-6 h, run in parts.
    steps: int = 24_000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.9995  # for runs over 20 k steps (world_analysis.md, section 2)
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    two_object_rate: float = 0.25
    # Three objects (world.scene.CORNERS): the 64-wide model, pretrained without them, draws two
    # objects at most, so three learned concepts in one image (issue 13) cannot be read on it.
    three_object_rate: float = 0.0
    # Share of objects that are family glyphs (world.scene.random_glyph): the prior that makes
    # each concept a new instance of a known kind.
    glyph_rate: float = 0.5
    seed: int = 0
    # Width of the cross-attention layers and of the text encoder: each K/V layer has this many
    # rows (CNS's neurons). At 64 a concept needed about half a layer's rows (bowtie: identity
    # 0.54 with 32 rows, 0.00 with 16; docs/world/cns-probe-2026-11-27), where SD-1.5's layers
    # are 320-1280 wide and CNS's 6% is 19-77 rows. 128 or 256 tests CNS at SD-like budgets: a
    # GPU job (64 took 8 h of CPU; 128's checkpoint is 74 MB against 21 MB).
    width: int = 64


def build_world_model(seed: int = 0, width: int = 64) -> DiffusionModel:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, width, width),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=width, attention_head_dim=8, norm_num_groups=16,
        )
        text_encoder = CLIPTextModel(tiny_clip_config(width))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False)
    return DiffusionModel(unet=unet, vae=None, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                          noise_scheduler=scheduler, reference="world")


def scene_batch(rng: np.random.Generator, batch_size: int, config: PretrainConfig,
                holdout: list[WorldConcept]) -> tuple[torch.Tensor, list[str]]:
    scenes = [random_base_scene(rng, config.two_object_rate, glyph_rate=config.glyph_rate, holdout=holdout,
                                three_object_rate=config.three_object_rate)
              for _ in range(batch_size)]
    pixels = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = ["" if rng.random() < config.caption_dropout else s.caption() for s in scenes]
    return pixels, captions


def trainable(model: DiffusionModel) -> dict[str, torch.nn.Parameter]:
    """What pretraining trains: the UNet and the text encoder, except the token table. The
    table stays at its seeded initialisation: the world has about 40 words, a frozen random
    table serves them as well, and the resumable checkpoint stays at ~22 MB instead of ~80 MB
    (the table is 49,408 x width and is rebuilt from the seed)."""
    frozen = model.text_encoder.get_input_embeddings().weight
    named = [(f"unet.{n}", p) for n, p in model.unet.named_parameters()]
    named += [(f"text_encoder.{n}", p) for n, p in model.text_encoder.named_parameters() if p is not frozen]
    return dict(named)


class Checkpoint:
    """A resumable pretraining state in one folder: ``checkpoint.safetensors`` (trainable
    weights and their EMA in float32, Adam's moments in bfloat16) and ``state.json`` (config,
    step, loss curve, seconds). Both are written to temporary files, then renamed, weights first;
    the weights carry their step in their metadata. A save killed before both renames is settled
    when the checkpoint is next read: finished if both files were written, dropped otherwise, so a
    kill never leaves half a checkpoint or new weights under an old step. A pretraining run holds
    ``writer.lock`` (flock: freed when it dies) while it writes; a reader beside it leaves its
    temporary files alone, and a second run on the same folder is refused."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.weights = self.directory / "checkpoint.safetensors"
        self.state_file = self.directory / "state.json"
        self._writer = None  # the open writer.lock while this process writes here

    @contextlib.contextmanager
    def writing(self):
        """Hold the folder's writer lock while pretraining writes it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "writer.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CNSError(self.directory, "another `cns world pretrain` is writing this checkpoint; wait for "
                               "it to stop (it checkpoints on SIGTERM) or use another --checkpoint",
                               "world_busy") from None
            self._writer = handle
            try:
                yield self
            finally:
                self._writer = None

    def exists(self) -> bool:
        self.settle()
        return self.weights.is_file() and self.state_file.is_file()

    def state(self) -> dict:
        self.settle()
        return json.loads(self.state_file.read_text())

    def settle(self) -> None:
        """Finish or drop a save that was killed before its renames (see the class); nothing while
        another process writes here (its save is under way, not killed)."""
        if self._writer is not None or not (self.directory / "writer.lock").exists():
            self._settle()
            return
        try:
            with self.writing():
                self._settle()
        except CNSError:  # a live run holds it
            return

    def _settle(self) -> None:
        weights_tmp, state_tmp = self.weights.with_suffix(".tmp"), self.state_file.with_suffix(".tmp")
        try:
            step = json.loads(state_tmp.read_text())["step"]  # written after the weights were complete
        except FileNotFoundError:
            weights_tmp.unlink(missing_ok=True)  # killed while writing the weights: the last save stands
            return
        except (ValueError, KeyError):  # killed while writing the state: the weights were not renamed yet
            weights_tmp.unlink(missing_ok=True)
            state_tmp.unlink()
            return
        if weights_tmp.exists():
            weights_tmp.replace(self.weights)
        if saved_step(self.weights) in (None, step):
            state_tmp.replace(self.state_file)
        else:
            state_tmp.unlink()

    def save(self, params: dict, ema: dict, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for (name, p), e in zip(params.items(), ema.values()):
            tensors[f"param.{name}"] = p.detach().float().cpu().contiguous()
            tensors[f"ema.{name}"] = e.float().cpu().contiguous()
            moments = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in moments:
                    tensors[f"{key}.{name}"] = moments[key].to(torch.bfloat16).cpu().contiguous()
        tmp = self.weights.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"step": str(state["step"])})
        state_tmp = self.state_file.with_suffix(".tmp")
        state_tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.weights)
        state_tmp.replace(self.state_file)

    def load(self, params: dict, ema: dict, optimizer: torch.optim.Optimizer, step: int) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(self.weights))
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"param.{name}"])
                ema[name].copy_(tensors[f"ema.{name}"])
                if f"exp_avg.{name}" in tensors:
                    optimizer.state[p] = {"step": torch.tensor(float(step)),
                                          "exp_avg": tensors[f"exp_avg.{name}"].float().to(p.device),
                                          "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].float().to(p.device)}


def saved_step(weights: Path) -> int | None:
    """The step a checkpoint's weights file was saved at (None: saved before it said)."""
    from safetensors import safe_open

    if not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


SPIKE_FACTOR = 1.25  # the finished 64-wide run's largest window-to-window rise was 1.28x, once (step 6,900)
SPIKE_LOOKBACK = 5


def loss_spike(curve: list[float]) -> float | None:
    """The loss before a spike, when the curve's last 100-step mean is over ``SPIKE_FACTOR`` times
    the median of the ``SPIKE_LOOKBACK`` before it (else None). The 128-wide run of 2026-12-07
    (AdamW 1e-3) jumped from 0.068 to 0.092 over steps 3,900-4,000 and stayed 7-8% above the
    64-wide run from then on, unnoticed for 10,000 steps; the warning and the record in
    ``state.json`` make such a run visible while it trains."""
    if len(curve) <= SPIKE_LOOKBACK:
        return None
    reference = float(np.median(curve[-SPIKE_LOOKBACK - 1:-1]))
    return reference if curve[-1] > SPIKE_FACTOR * reference else None


def lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def pretrain(checkpoint_dir: str | Path, config: PretrainConfig, *, device: str = "cpu",
             budget_minutes: float | None = None, checkpoint_minutes: float = 10.0,
             progress: bool = True) -> dict:
    """Train from scratch, or resume from ``checkpoint_dir``, until ``config.steps`` or until
    ``budget_minutes`` of wall clock have passed; checkpoints every ``checkpoint_minutes`` and
    before returning. Returns the checkpoint's state (``state["step"] == config.steps`` when done).

    A resumed run draws its scenes and noise from generators seeded with (seed, step), so the same
    resume points give the same weights; it is not bit-identical to an uninterrupted run."""
    with Checkpoint(checkpoint_dir).writing() as checkpoint:
        return _pretrain(checkpoint, config, device=device, budget_minutes=budget_minutes,
                         checkpoint_minutes=checkpoint_minutes, progress=progress)


def _pretrain(checkpoint: "Checkpoint", config: PretrainConfig, *, device: str, budget_minutes: float | None,
              checkpoint_minutes: float, progress: bool) -> dict:
    model = build_world_model(config.seed, config.width).to(device)
    model.freeze()
    params = trainable(model)
    for p in params.values():
        p.requires_grad_(True)
    model.unet.train()
    model.text_encoder.train()
    ema = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.learning_rate, weight_decay=0.01)
    state = {"config": asdict(config), "step": 0, "train_seconds": 0.0, "loss_curve": [], "parts": []}
    if checkpoint.exists():
        saved = checkpoint.state()
        # a key added later (at its default) is no difference: the 64-wide checkpoint has no width
        if PretrainConfig(**saved["config"]) != config:
            raise CNSError(checkpoint.state_file, "made with other settings than these; delete the folder to "
                           "start again, or resume with its settings", "world_invalid")
        state = saved
        checkpoint.load(params, ema, optimizer, state["step"])
        log.info("resuming pretraining at step %d of %d", state["step"], config.steps)
    start_step = state["step"]
    if start_step >= config.steps:
        return state
    for group in optimizer.param_groups:
        group["initial_lr"] = config.learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config), last_epoch=start_step - 1)
    holdout = load_concepts()
    rng = np.random.default_rng([config.seed, start_step])
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + start_step)
    machine = f"{platform.machine()} {torch.get_num_threads()} threads" if device == "cpu" else \
        (torch.cuda.get_device_name() if torch.cuda.is_available() else device)
    part = {"from_step": start_step, "device": device, "machine": machine, "torch": torch.__version__}
    started = last_save = time.monotonic()
    window: list[float] = []

    def save(step: int) -> None:
        nonlocal last_save
        elapsed = time.monotonic() - started
        state.update(step=step, train_seconds=round(state["train_seconds"] + elapsed - part.get("seconds", 0.0), 1))
        part.update(to_step=step, seconds=round(elapsed, 1))
        state["parts"] = [p for p in state["parts"] if p is not part] + [part]
        checkpoint.save(params, ema, optimizer, state)
        last_save = time.monotonic()

    def train_step(step: int) -> None:
        nonlocal window
        pixels, captions = scene_batch(rng, config.batch_size, config, holdout)
        # cns's own loss (noise, then timesteps, from the generator; v target): the same objective
        # the concepts are later learned with.
        loss = diffusion_loss(model, pixels, encode_prompts(model, tokenize(model, captions)), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.values()), [p.detach() for p in params.values()], 1 - decay)
        window.append(loss.item())
        if len(window) == 100:
            state["loss_curve"].append(round(float(np.mean(window)), 5))
            bar.set_postfix(loss=f"{state['loss_curve'][-1]:.4f}")
            if not progress:
                log.info("step %d/%d loss %.4f", step + 1, config.steps, state["loss_curve"][-1])
            reference = loss_spike(state["loss_curve"])
            if reference is not None:
                state.setdefault("spikes", []).append(
                    {"step": step + 1, "loss": state["loss_curve"][-1], "before": round(reference, 5)})
                log.warning("loss spike at step %d: %.4f over the last 100 steps against %.4f before; if the "
                            "loss stays up, lower world.pretrain.learning_rate and start again", step + 1,
                            state["loss_curve"][-1], reference)
            window = []

    bar = tqdm(range(start_step, config.steps), desc="pretraining", disable=not progress, mininterval=10,
               initial=start_step, total=config.steps)
    step = start_step
    with stop_requests() as stop:
        for step in bar:
            train_step(step)
            now = time.monotonic()
            if stop.is_set():
                save(step + 1)
                log.info("stopped at step %d of %d, checkpoint saved; resume with the same command", step + 1,
                         config.steps)
                return state
            if budget_minutes is not None and now - started >= budget_minutes * 60:
                save(step + 1)
                log.info("time budget reached at step %d of %d; resume with the same command", step + 1,
                         config.steps)
                return state
            if now - last_save >= checkpoint_minutes * 60:
                save(step + 1)
    save(config.steps)
    return state


@contextlib.contextmanager
def stop_requests():
    """An event set by SIGTERM or SIGINT (a scheduler's stop, Ctrl-C): the pretraining loop then
    checkpoints and returns at the end of the step instead of losing the work since its last
    checkpoint. A second signal acts as it would have. Off the main thread (where Python delivers
    no signals) the event is never set."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return
    previous = {}

    def handler(signum, frame):
        if asked.is_set():  # asked twice: do what the signal did before
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        log.warning("%s: checkpointing at the end of this step, then stopping", signal.Signals(signum).name)
        asked.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield asked
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def export_model(checkpoint_dir: str | Path, out_dir: str | Path, evaluate_fn=None) -> dict:
    """The checkpoint's EMA weights as a pixel-space model folder (written to a temporary folder,
    then renamed), with ``pretrain.json``: the training record and, when given, its evaluation."""
    checkpoint = Checkpoint(checkpoint_dir)
    if not checkpoint.exists():
        raise CNSError(checkpoint.directory, "no pretraining checkpoint here: run `cns world pretrain`", "world_missing")
    from safetensors.torch import load_file

    state = checkpoint.state()
    config = PretrainConfig(**state["config"])
    model = build_world_model(config.seed, config.width)
    tensors = load_file(str(checkpoint.weights))
    with torch.no_grad():
        for name, p in trainable(model).items():
            p.copy_(tensors[f"ema.{name}"])
    model.freeze()
    curve = state["loss_curve"]
    record = {
        "config": state["config"], "steps_done": state["step"], "complete": state["step"] >= config.steps,
        "train_seconds": state["train_seconds"], "parts": state["parts"],
        "final_loss": float(np.mean(curve[-2:])) if curve else None, "loss_curve": curve,
        "spikes": state.get("spikes", []),
        "unet_parameters": model.unet_parameters(),
        "text_encoder_parameters": sum(p.numel() for p in model.text_encoder.parameters()),
    }
    if evaluate_fn is not None:
        record["evaluation"] = evaluate_fn(model)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pixel_model(model, tmp)
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return record
