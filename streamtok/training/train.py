"""Training recipe for the causal codec: reconstruction first, adversarial later (optional).

Resumable: ``OUT/checkpoint.pt`` holds model, optimizers and step; ``OUT/log.jsonl`` one line per
log interval; ``OUT/best.safetensors`` + ``OUT/config.json`` the best weights on validation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from streamtok.models.codec import CausalCodec, CodecConfig, count_parameters
from streamtok.models.weights import read_metadata, save_codec, warm_start
from streamtok.training.data import Augmenter, SpeechCorpus
from streamtok.training.discriminator import adversarial_losses, build_discriminator
from streamtok.training.losses import MultiScaleMelLoss, log_mel_distance, si_sdr

log = logging.getLogger("streamtok.training")


@dataclass
class TrainOptions:
    config: str
    data: str
    out: str
    val: str | None = None
    noise: str | None = None
    steps: int = 100_000
    threads: int = 1
    device: str = "cpu"
    log_every: int = 25
    ckpt_every: int = 200
    val_every: int = 1000
    val_clips: int = 24
    seed: int = 0
    init: str | None = None  # weights to start from when OUT has no checkpoint (e.g. the shipped ones)
    time_limit: float | None = None  # seconds of training after which this invocation stops (checkpointed)
    fit_decay: bool = False  # with time_limit: measure the speed, then size decay_steps to end at the limit
    # The run's settings (keys of RECIPE). None means "not given": a new run takes RECIPE's value, a
    # resumed run the value its checkpoint kept, so it goes on as it was started unless told otherwise.
    lr: float | None = None
    decay_from: int | None = None  # step at which a cycle starts: warm-up, then a cosine decay
    warmup: int | None = None  # steps of linear rise from lr_min to lr at the cycle's start
    decay_steps: int | None = None
    lr_min: float | None = None
    ema: float | None = None  # decay of an exponential moving average of the weights, validated and kept as best
    quantizer_dropout: float | None = None  # share of crops trained at a random depth 1..levels
    new_lr_scale: float | None = None  # learning-rate multiplier for the tensors ``init`` lacked (grown layers)
    batch: int | None = None
    segment_seconds: float | None = None
    adversarial_from: int | None = None  # step at which the discriminator joins
    disc: str | None = None  # which discriminator (see streamtok.training.discriminator)
    disc_batch: int | None = None  # items of each batch the GAN losses see (saves CPU)
    mel_loss: str | None = None  # scales of the multi-scale mel loss (a key of losses.MEL_SCALES)
    gain_db: tuple[float, float] | None = None  # range of the random gain on crops (clips sit at -23 dBFS)


# The recipe's values of the run settings; None for the optional parts means "off" (no decay, no
# weight average, no adversarial phase, the GAN losses see the whole batch).
RECIPE: dict[str, object] = {
    "lr": 3e-4, "decay_from": None, "warmup": 0, "decay_steps": 10_000, "lr_min": 3e-5, "ema": None,
    "quantizer_dropout": 0.5, "new_lr_scale": 1.0, "batch": 8, "segment_seconds": 1.0,
    "adversarial_from": None, "disc": "mpd", "disc_batch": None, "mel_loss": "4-scale",
    "gain_db": (-12.0, 6.0),
}


# fit_decay times the steps between these two (counted from the run's start): the first ones are
# slow (cuDNN's kernel search, allocator warm-up) and are left out.
FIT_WINDOW = (20, 220)


def settle(opts: TrainOptions, saved: dict | None = None) -> TrainOptions:
    """``opts`` with every run setting not given filled in: from ``saved`` (a resumed run's own
    settings) where it has the key, else from RECIPE."""
    base = RECIPE | {k: v for k, v in (saved or {}).items() if k in RECIPE}
    return dataclasses.replace(opts, **{k: base[k] for k in RECIPE if getattr(opts, k) is None})


def saved_settings(ckpt: dict) -> dict:
    """The run settings a checkpoint kept (older checkpoints kept only the schedule and the
    weight average's decay)."""
    if "options" in ckpt:
        return ckpt["options"]
    saved = dict(ckpt.get("schedule") or {})
    if ckpt.get("ema_decay"):
        saved["ema"] = ckpt["ema_decay"]
    return saved

def learning_rate(opts: TrainOptions, step: int) -> float:
    """``lr`` until ``decay_from``; from there a linear rise from ``lr_min`` to ``lr`` over
    ``warmup`` steps (a fresh optimizer, or a warm restart, takes big steps gently), then a cosine
    down to ``lr_min`` over ``decay_steps``, then flat.

    A function of the step alone, so a resumed run takes up the schedule where it stopped.
    """
    if opts.decay_from is None or step < opts.decay_from:
        return opts.lr
    since, warmup = step - opts.decay_from, opts.warmup or 0
    if since < warmup:
        return opts.lr_min + (opts.lr - opts.lr_min) * (since + 1) / warmup
    t = min(1.0, (since - warmup) / max(1, opts.decay_steps))
    return opts.lr_min + 0.5 * (opts.lr - opts.lr_min) * (1.0 + math.cos(math.pi * t))


class WeightAverage:
    """An exponential moving average of a model's parameters (Polyak averaging). Buffers (the
    codebooks, themselves running averages) are copied from the live model."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for avg, live in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.lerp_(live, 1.0 - self.decay)
        for avg, live in zip(self.model.buffers(), model.buffers(), strict=True):
            avg.copy_(live)


def _param_groups(model: torch.nn.Module, new: list[str], scale: float) -> list[dict]:
    """One optimizer group for the trained tensors and, if any, one for those ``init`` lacked
    (``new``), whose learning rate is ``scale`` times the schedule's so grown layers catch up."""
    fresh = set(new)
    named = list(model.named_parameters())
    groups = [{"params": [p for k, p in named if k not in fresh], "lr_scale": 1.0}]
    if any(k in fresh for k, _ in named):
        groups.append({"params": [p for k, p in named if k in fresh], "lr_scale": scale})
    return groups


def _val_score(model: CausalCodec, clips: list[np.ndarray], sr: int) -> dict[str, float]:
    """Validation log-mel distance and SI-SDR of the full-depth codec, scored on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    mel, sdr = [], []
    with torch.no_grad():
        for clip in clips:
            x = torch.from_numpy(clip)[None]
            codes = model.encode(x.to(device)).codes
            y = model.decode(codes)[0, : x.shape[-1]].cpu()
            mel.append(log_mel_distance(y, x[0], sr))
            sdr.append(si_sdr(y, x[0]))
    model.train()
    return {"val_mel": float(np.mean(mel)), "val_sisdr": float(np.mean(sdr))}


def train(opts: TrainOptions) -> None:
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = CodecConfig.from_json(opts.config)
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # crops have one shape: let cuDNN pick its fastest kernels
    model = CausalCodec(cfg).to(device)
    log.info("model %s: %.2f M parameters, %d Hz, frame %d", cfg.name,
             count_parameters(model) / 1e6, cfg.sample_rate, cfg.frame_size)
    ckpt_path = out / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False) if ckpt_path.exists() else None
    given = {k for k in RECIPE if getattr(opts, k) is not None}
    opts = settle(opts, saved_settings(ckpt) if ckpt is not None else None)
    if ckpt is not None:
        kept = {k: getattr(opts, k) for k in RECIPE if k not in given and getattr(opts, k) != RECIPE[k]}
        log.info("resuming with the run's own settings%s", f" (kept: {kept})" if kept else "")
    disc = build_discriminator(opts.disc).to(device)
    step, new = 0, []
    branched = ckpt is None and bool(opts.init)  # a new run from another run's weights
    if branched:
        # A new machine goes on from shipped weights: model only (fresh optimizer state), step
        # count from the file's metadata so logs and the model card keep counting. The config may
        # have grown (a layer added): those tensors start from their initialisation.
        new = warm_start(model, opts.init)
        model.to(device)
        step = int(read_metadata(opts.init).get("step", 0))
        log.info("initialised from %s (step %d)%s", opts.init, step,
                 f"; new tensors: {len(new)}" if new else "")
    elif ckpt is not None:
        new = ckpt.get("new_params", [])
    opt = torch.optim.AdamW(_param_groups(model, new, opts.new_lr_scale), lr=opts.lr, betas=(0.5, 0.9),
                            weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=opts.lr, betas=(0.5, 0.9), weight_decay=0.0)
    mel_loss = MultiScaleMelLoss(cfg.sample_rate, opts.mel_loss).to(device)

    best = math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if ckpt.get("disc_kind", "stft") == opts.disc:
            disc.load_state_dict(ckpt["disc"])
            opt_d.load_state_dict(ckpt["opt_d"])
        else:
            log.info("discriminator changed (%s -> %s): it starts fresh", ckpt.get("disc_kind", "stft"),
                     opts.disc)
        step, best = ckpt["step"], ckpt.get("best", math.inf)
        log.info("resumed from %s at step %d", ckpt_path, step)
    ema = WeightAverage(model, opts.ema) if opts.ema else None
    if ema is not None and ckpt is not None and "ema" in ckpt:
        ema.model.load_state_dict(ckpt["ema"])
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    corpus = SpeechCorpus.from_folder(opts.data, cfg.sample_rate)
    noise = SpeechCorpus.from_folder(opts.noise, cfg.sample_rate) if opts.noise else None
    segment = int(round(opts.segment_seconds * cfg.sample_rate / cfg.frame_size)) * cfg.frame_size
    aug = Augmenter(corpus, segment, noise, gain_db=tuple(opts.gain_db), seed=opts.seed + step)
    val_clips: list[np.ndarray] = []
    if opts.val:
        val = SpeechCorpus.from_folder(opts.val, cfg.sample_rate, limit=None)
        rng = np.random.default_rng(1234)
        picks = rng.choice(len(val.clips), size=min(opts.val_clips, len(val.clips)), replace=False)
        val_clips = [val.clips[i][: cfg.sample_rate * 6] for i in sorted(picks)]

    levels = cfg.quantizer.levels
    logf = (out / "log.jsonl").open("a")
    if branched:  # so the run's training time can count what came before
        logf.write(json.dumps({"step": step, "init": str(Path(opts.init).resolve())}) + "\n")
    acc: dict[str, float] = {}
    t0 = time.monotonic()
    start, fit_at = step, None
    if opts.fit_decay:
        if opts.time_limit is None or opts.decay_from is None:
            raise ValueError("fit_decay needs time_limit and decay_from")
        fit_at = (start + FIT_WINDOW[0], start + FIT_WINDOW[1])
    model.train()
    bar = tqdm(total=opts.steps, initial=step, desc="train", dynamic_ncols=True)
    timed_out = False
    while step < opts.steps and not timed_out:
        lr = learning_rate(opts, step)
        for group in opt.param_groups + opt_d.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        x = torch.from_numpy(aug.batch(opts.batch)).to(device)
        active = torch.full((opts.batch,), levels, device=device)
        drop = torch.rand(opts.batch, device=device) < opts.quantizer_dropout
        active[drop] = torch.randint(1, levels + 1, (int(drop.sum()),), device=device)
        y, q = model(x, active)
        l_mel = mel_loss(y, x)
        l_time = (y - x).abs().mean()
        loss = l_mel + 0.1 * l_time + 1.0 * q.commit_loss
        parts = {"mel": l_mel.item(), "l1": l_time.item(), "commit": q.commit_loss.item()}
        adversarial = opts.adversarial_from is not None and step >= opts.adversarial_from
        if adversarial:
            yd, xd = y[:opts.disc_batch], x[:opts.disc_batch]
            l_adv, l_feat = adversarial_losses(disc, yd, xd)
            loss = loss + 0.5 * l_adv + 1.0 * l_feat
            parts |= {"adv": l_adv.item(), "feat": l_feat.item()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema.update(model)
        if adversarial:
            l_d = disc.discriminator_loss(yd.detach(), xd)
            opt_d.zero_grad(set_to_none=True)
            l_d.backward()
            opt_d.step()
            parts["disc"] = l_d.item()
        step += 1
        bar.update(1)
        if fit_at is not None and step in fit_at:
            if step == fit_at[0]:
                t_fit = time.monotonic()
            else:
                opts, fit_at = _fit_decay(opts, step, (time.monotonic() - t_fit) / (fit_at[1] - fit_at[0]),
                                          opts.time_limit - (time.monotonic() - t0), len(val_clips)), None
                logf.write(json.dumps({"step": step, "fitted_decay_steps": opts.decay_steps}) + "\n")
        timed_out = opts.time_limit is not None and time.monotonic() - t0 >= opts.time_limit
        last = step == opts.steps or timed_out
        for k, v in (parts | {"gnorm": float(gnorm)}).items():
            acc[k] = acc.get(k, 0.0) + v
        if step % opts.log_every == 0:
            row = {"step": step, "time": round(time.monotonic() - t0, 1), "lr": lr}
            row |= {k: round(v / opts.log_every, 5) for k, v in acc.items()}
            acc.clear()
            logf.write(json.dumps(row) + "\n")
            logf.flush()
            bar.set_postfix(mel=row["mel"], commit=row["commit"])
        if val_clips and (step % opts.val_every == 0 or last):
            score = _val_score(model, val_clips, cfg.sample_rate)
            kept = model
            if ema is not None:  # the average is what is kept; the live weights' score is logged beside it
                score = {f"live_{k}": v for k, v in score.items()} | _val_score(ema.model, val_clips, cfg.sample_rate)
                kept = ema.model
            logf.write(json.dumps({"step": step, **score}) + "\n")
            logf.flush()
            log.info("step %d validation %s", step, score)
            if score["val_mel"] < best:
                best = score["val_mel"]
                save_codec(kept, out / "best.safetensors", {"step": str(step), **{k: str(v) for k, v in score.items()}})
        if step % opts.ckpt_every == 0 or last:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "disc": disc.state_dict(), "opt": opt.state_dict(),
                        "opt_d": opt_d.state_dict(), "disc_kind": opts.disc, "step": step, "new_params": new, "best": best,
                        "options": {k: getattr(opts, k) for k in RECIPE},
                        **({"ema": ema.model.state_dict()} if ema is not None else {})},
                       tmp)
            tmp.replace(ckpt_path)
            save_codec(model, out / "last.safetensors", {"step": str(step)})
            if ema is not None:
                # the average as it is now: after a change of loss, the validation log-mel that
                # picks best.safetensors may no longer rank what the run is after
                save_codec(ema.model, out / "average.safetensors", {"step": str(step)})
    bar.close()
    logf.close()
    if timed_out:
        log.info("time limit reached at step %d (%d steps this run)", step, step - start)


def _fit_decay(opts: TrainOptions, step: int, step_seconds: float, seconds_left: float,
               val_clips: int) -> TrainOptions:
    """``opts`` with ``decay_steps`` sized so the warm-up and the cosine end at about 90 % of the
    time left, counting validation at an estimated (not measured) 0.05 s per clip and scoring."""
    scored = 2 if opts.ema else 1  # with a weight average, the live and the averaged weights
    val_cost = 0.05 * val_clips * scored / opts.val_every  # per step
    steps_left = int(0.9 * seconds_left / (step_seconds + val_cost))
    done = step - opts.decay_from
    decay = max(1, steps_left + done - (opts.warmup or 0))
    log.info("%.3f s per step, %.0f s left: decay over %d steps", step_seconds, seconds_left, decay)
    return dataclasses.replace(opts, decay_steps=decay)
