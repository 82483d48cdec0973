"""The training recipe on the tiny config: it runs, logs, checkpoints, validates, resumes, and a
new machine can go on from shipped weights (``--init``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from streamtok.models.codec import CausalCodec, CodecConfig
from streamtok.models.weights import load_codec, read_metadata, save_codec
from streamtok.training.losses import MEL_SCALES, MultiScaleMelLoss
from streamtok.training.train import (
    RECIPE,
    TrainOptions,
    learning_rate,
    saved_settings,
    settle,
    train,
)

CONFIG = Path(__file__).resolve().parents[1] / "streamtok" / "models" / "configs" / "tiny.json"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Three 1.5 s clips of chirps in noise, with a manifest, as the speech folders have."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file\tduration_s\tsample_rate"]
    for i in range(3):
        t = np.arange(24000) / 16000
        x = 0.2 * np.sin(2 * np.pi * (150 + 50 * i) * t * (1 + t)) + 0.01 * rng.standard_normal(t.size)
        sf.write(folder / f"c{i}.wav", x.astype(np.float32), 16000)
        rows.append(f"c{i}.wav\t1.5\t16000")
    (folder / "manifest.tsv").write_text("\n".join(rows) + "\n")
    return folder


def options(corpus: Path, out: Path, steps: int, **kw) -> TrainOptions:
    return TrainOptions(config=str(CONFIG), data=str(corpus), val=str(corpus), out=str(out), steps=steps,
                        **{"batch": 2, "segment_seconds": 0.4, "log_every": 2, "ckpt_every": 2, "val_every": 2,
                           "val_clips": 2} | kw)


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_logs_checkpoints_validates_and_resumes(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(options(corpus, out, steps=4))
    rows = log_rows(out)
    assert [r["step"] for r in rows if "mel" in r] == [2, 4]
    assert all(np.isfinite(r["mel"]) and r["mel"] > 0 for r in rows if "mel" in r)
    assert [r["step"] for r in rows if "val_mel" in r] == [2, 4]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4
    assert read_metadata(out / "best.safetensors")["step"] in {"2", "4"}
    before = load_codec(out / "last.safetensors").state_dict()

    train(options(corpus, out, steps=6))  # resumes at 4, not from scratch
    rows = log_rows(out)
    assert [r["step"] for r in rows if "mel" in r] == [2, 4, 6]
    after = load_codec(out / "last.safetensors").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_init_goes_on_from_shipped_weights(corpus: Path, tmp_path: Path) -> None:
    """With no checkpoint, --init loads the given weights and their step count."""
    torch.manual_seed(5)
    shipped = CausalCodec(CodecConfig.from_json(CONFIG))
    path = tmp_path / "shipped.safetensors"
    save_codec(shipped, path, {"step": "100"})
    out = tmp_path / "run"
    train(options(corpus, out, steps=102, init=str(path), lr=0.0))  # lr 0: weights stay put
    assert [r["step"] for r in log_rows(out) if "mel" in r] == [102]
    trained = load_codec(out / "last.safetensors").state_dict()
    ref = load_codec(path).state_dict()
    conv = [k for k in ref if k.endswith("weight") and "quantizer" not in k]
    assert conv and all(torch.equal(trained[k], ref[k]) for k in conv)


@pytest.mark.parametrize("kind", ["mpd", "stft"])
def test_adversarial_phase_trains_the_discriminator(corpus: Path, tmp_path: Path, kind: str) -> None:
    """From ``adversarial_from`` on, the generator sees GAN and feature losses and the
    discriminator is stepped; a resume with another discriminator starts that one fresh."""
    out = tmp_path / "run"
    train(options(corpus, out, steps=2, adversarial_from=2, disc=kind, disc_batch=1))
    before = torch.load(out / "checkpoint.pt", weights_only=False)["disc"]
    train(options(corpus, out, steps=4, adversarial_from=2, disc=kind, disc_batch=1))
    rows = [r for r in log_rows(out) if "mel" in r]
    assert "adv" not in rows[0] and "disc" not in rows[0]  # steps 1-2: reconstruction only
    assert all(np.isfinite(rows[1][k]) and rows[1][k] > 0 for k in ("adv", "feat", "disc"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["disc_kind"] == kind
    assert before.keys() == ckpt["disc"].keys()
    assert any(not torch.equal(before[k], ckpt["disc"][k]) for k in before)

    other = "stft" if kind == "mpd" else "mpd"
    train(options(corpus, out, steps=6, adversarial_from=2, disc=other, disc_batch=1))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["disc_kind"] == other
    assert [r["step"] for r in log_rows(out) if "disc" in r] == [4, 6]


def test_learning_rate_schedule() -> None:
    opts = TrainOptions(config="", data="", out="", lr=3e-4, decay_from=100, decay_steps=50, lr_min=3e-5)
    assert learning_rate(opts, 0) == learning_rate(opts, 100) == 3e-4
    assert learning_rate(opts, 125) == pytest.approx((3e-4 + 3e-5) / 2)
    assert learning_rate(opts, 150) == pytest.approx(3e-5)
    assert learning_rate(opts, 10_000) == pytest.approx(3e-5)
    lrs = [learning_rate(opts, s) for s in range(90, 160)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert learning_rate(TrainOptions(config="", data="", out="", lr=1e-3), 10**6) == 1e-3


def test_resume_keeps_the_runs_learning_rate_schedule(corpus: Path, tmp_path: Path) -> None:
    """A run started with a decay and resumed without the flags goes on decaying."""
    out = tmp_path / "run"
    train(options(corpus, out, steps=4, decay_from=0, decay_steps=4, lr=1e-3, lr_min=1e-5))
    train(options(corpus, out, steps=6, lr=1e-3))  # no decay flags
    lrs = [r["lr"] for r in log_rows(out) if "lr" in r]
    assert lrs[-1] == pytest.approx(1e-5)  # the decay's floor, not 1e-3 again


def test_resume_keeps_every_run_setting_unless_the_caller_overrides_it(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(options(corpus, out, steps=2, quantizer_dropout=0.0, lr=2e-3, ema=0.5))
    train(TrainOptions(config=str(CONFIG), data=str(corpus), out=str(out), steps=4, log_every=2, lr=1e-3))  # only lr given
    kept = torch.load(out / "checkpoint.pt", weights_only=False)["options"]
    assert kept | {"batch": None} == RECIPE | {"quantizer_dropout": 0.0, "lr": 1e-3, "ema": 0.5, "batch": None,
                                               "segment_seconds": 0.4}
    assert kept["batch"] == 2  # not the recipe's 8
    assert [r["lr"] for r in log_rows(out) if "lr" in r] == [2e-3, 1e-3]


def test_a_checkpoint_from_before_options_were_kept_resumes_its_schedule_and_average() -> None:
    old = {"schedule": {"lr": 3e-4, "decay_from": 20000, "decay_steps": 10000, "lr_min": 3e-5}, "ema_decay": 0.999}
    opts = settle(TrainOptions(config="", data="", out="", batch=4), saved_settings(old))
    assert (opts.decay_from, opts.ema, opts.batch, opts.quantizer_dropout) == (20000, 0.999, 4, 0.5)
    assert learning_rate(opts, 40000) == pytest.approx(3e-5)


def test_grown_layers_learn_at_their_own_rate_and_keep_it_on_resume(corpus: Path, tmp_path: Path) -> None:
    """--init into a deeper decoder: the new blocks form their own optimizer group at
    new_lr_scale x the schedule, kept when the run resumes from its checkpoint."""
    path = tmp_path / "shipped.safetensors"
    save_codec(CausalCodec(CodecConfig.from_json(CONFIG)), path, {"step": "10"})
    data = json.loads(CONFIG.read_text())
    data["seanet"]["decoder_residual_layers"] = 2
    grown = tmp_path / "grown.json"
    grown.write_text(json.dumps(data))
    out = tmp_path / "run"
    opts = options(corpus, out, steps=12, init=str(path), lr=1e-3, new_lr_scale=10.0)
    opts.config = str(grown)
    train(opts)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["new_params"] and all(".block." in k for k in ckpt["new_params"])
    groups = ckpt["opt"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])
    assert len(groups[1]["params"]) == len(ckpt["new_params"])
    opts.steps, opts.init = 14, None
    train(opts)  # resumes: same groups, same rates
    groups = torch.load(out / "checkpoint.pt", weights_only=False)["opt"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])


def test_training_time_counts_the_run_a_branch_started_from(tmp_path: Path) -> None:
    from streamtok.training.ship import training_time_hours

    def write(run: Path, rows: list[dict]) -> None:
        run.mkdir()
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    main, branch = tmp_path / "main", tmp_path / "branch"
    # main: 3600 s to step 100, resumed, 1800 s more to step 200, then on to step 300
    write(main, [{"step": 50, "time": 1800.0}, {"step": 100, "time": 3600.0}, {"step": 150, "time": 900.0},
                 {"step": 150, "val_mel": 0.3}, {"step": 200, "time": 1800.0}, {"step": 300, "time": 3600.0}])
    assert training_time_hours(main) == (300, pytest.approx(2.0))
    assert training_time_hours(main, until=200) == (200, pytest.approx(1.5))
    write(branch, [{"step": 200, "init": str(main / "last.safetensors")}, {"step": 250, "time": 720.0}])
    assert training_time_hours(branch) == (250, pytest.approx(1.5 + 0.2))
    write(tmp_path / "fresh", [{"step": 0, "init": str(tmp_path / "elsewhere" / "w.safetensors")},
                               {"step": 10, "time": 360.0}])
    assert training_time_hours(tmp_path / "fresh") == (10, pytest.approx(0.1))


def test_a_run_from_init_logs_where_it_started(corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "shipped.safetensors"
    save_codec(CausalCodec(CodecConfig.from_json(CONFIG)), path, {"step": "100"})
    out = tmp_path / "run"
    train(options(corpus, out, steps=102, init=str(path)))
    assert log_rows(out)[0] == {"step": 100, "init": str(path.resolve())}
    train(options(corpus, out, steps=104))  # a resume does not log it again
    assert sum("init" in r for r in log_rows(out)) == 1


def test_weight_average_follows_the_live_weights() -> None:
    from streamtok.training.train import WeightAverage

    model = torch.nn.Linear(3, 2)
    model.register_buffer("count", torch.zeros(()))
    avg = WeightAverage(model, 0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.count.fill_(7)
    avg.update(model)
    assert torch.allclose(avg.model.weight, start + 0.1)  # 0.9 * old + 0.1 * new
    assert float(avg.model.count) == 7  # buffers are copied, not averaged
    assert not any(p.requires_grad for p in avg.model.parameters())
    with pytest.raises(ValueError):
        WeightAverage(model, 1.0)


def test_ema_run_keeps_the_average_as_best_and_resumes_it(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    opts = options(corpus, out, steps=4, ema=0.5, lr=1e-3)
    opts.val_every = 4  # one validation: the best file is from step 4, where the checkpoint is
    train(opts)
    vals = [r for r in log_rows(out) if "val_mel" in r]
    assert [r["step"] for r in vals] == [4] and all("live_val_mel" in r for r in vals)
    assert any(r["val_mel"] != r["live_val_mel"] for r in vals)  # two different models scored
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    live, avg = ckpt["model"], ckpt["ema"]
    conv = [k for k in live if k.endswith("conv.weight")]
    assert any(not torch.equal(live[k], avg[k]) for k in conv)
    best = load_codec(out / "best.safetensors").state_dict()
    assert all(torch.equal(best[k], avg[k]) for k in conv)  # the average, not the live weights
    average = load_codec(out / "average.safetensors").state_dict()  # the average at the checkpoint
    assert all(torch.equal(average[k], avg[k]) for k in conv)
    opts.steps, opts.ema = 8, None
    train(opts)  # resumes the average too, without the flag
    resumed = torch.load(out / "checkpoint.pt", weights_only=False)
    assert resumed["options"]["ema"] == 0.5
    assert any(not torch.equal(resumed["ema"][k], avg[k]) for k in conv)
    assert [r["step"] for r in log_rows(out) if "live_val_mel" in r] == [4, 8]


def test_a_cycle_warms_up_linearly_then_decays() -> None:
    opts = TrainOptions(config="", data="", out="", lr=2e-4, decay_from=100, warmup=10, decay_steps=40,
                        lr_min=2e-5)
    assert learning_rate(opts, 99) == 2e-4  # before the cycle: the flat rate
    assert learning_rate(opts, 100) == pytest.approx(2e-5 + 1.8e-4 / 10)
    assert learning_rate(opts, 104) == pytest.approx(2e-5 + 1.8e-4 / 2)
    assert learning_rate(opts, 109) == pytest.approx(2e-4)  # top reached at the warm-up's end
    assert learning_rate(opts, 130) == pytest.approx((2e-4 + 2e-5) / 2)  # cosine's midpoint
    assert learning_rate(opts, 150) == pytest.approx(2e-5)
    rise = [learning_rate(opts, s) for s in range(100, 110)]
    assert all(a < b for a, b in zip(rise, rise[1:], strict=False))


def test_time_limit_stops_checkpointed_and_fit_decay_ends_the_cycle_before_it(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a time limit the run stops on its own, checkpointed and validated at its last step;
    fit_decay times the first steps and sizes the decay so the rate is at its floor by then.
    The run's clock is a fake one that moves 10 ms per reading, so the outcome does not depend on
    the machine's load."""
    import types

    import streamtok.training.train as train_mod

    clock = iter(i * 0.01 for i in range(10**7))
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    monkeypatch.setattr(train_mod, "FIT_WINDOW", (2, 8))
    out = tmp_path / "run"
    train(options(corpus, out, steps=10**6, time_limit=1.0, fit_decay=True, decay_from=0, warmup=2,
                  lr=1e-3, lr_min=1e-5, val_every=10**6))
    rows = log_rows(out)
    fitted = [r["fitted_decay_steps"] for r in rows if "fitted_decay_steps" in r]
    assert len(fitted) == 1 and fitted[0] > 0
    last = torch.load(out / "checkpoint.pt", weights_only=False)
    assert 8 < last["step"] < 10**6
    assert last["options"]["decay_steps"] == fitted[0]  # a resume keeps the fitted cycle
    assert [r["step"] for r in rows if "val_mel" in r] == [last["step"]]  # validated once, at the stop
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] == pytest.approx(1e-5)
    assert 0.8 * last["step"] <= 2 + fitted[0] < last["step"]  # the cycle ends shortly before the stop


def test_fit_decay_needs_a_time_limit_and_a_cycle(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fit_decay"):
        train(options(corpus, tmp_path / "run", steps=4, fit_decay=True, decay_from=0))


def test_a_packed_corpus_reads_like_the_original(corpus: Path, tmp_path: Path) -> None:
    """Packing re-encodes every clip as Opus with the manifest rewritten: the packed folder
    loads as many clips, of the same lengths, close to the originals."""
    import shutil

    from streamtok.training.data import SpeechCorpus
    from streamtok.training.pack import pack

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    packed = tmp_path / "packed"
    assert pack(corpus, packed, kbps=32) == 3
    assert sorted(p.name for p in packed.iterdir()) == ["c0.opus", "c1.opus", "c2.opus", "manifest.tsv"]
    a, b = SpeechCorpus.from_folder(corpus, 16000), SpeechCorpus.from_folder(packed, 16000)
    assert [len(x) for x in a.clips] == [len(x) for x in b.clips]
    for x, y in zip(a.clips, b.clips, strict=True):
        err = np.mean((x - y) ** 2) / np.mean(x ** 2)
        assert err < 0.1  # lossy, but the same signal (a wrong clip or a shift would be ~1-2)


def test_the_seven_scale_mel_loss_sees_timing_the_four_scale_one_hardly_sees() -> None:
    """A pulse train 1 ms late: to the 4-scale loss (hops of 4 ms and more) it is a small error
    next to faint noise; the 7-scale loss's 2 ms windows see it."""
    x = torch.zeros(1, 16000)
    x[0, 1000::160] = 0.5  # 100 Hz pitch pulses
    late = torch.roll(x, 16, dims=1)
    noisy = x + 0.01 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    share = {}
    for scales in MEL_SCALES:
        loss = MultiScaleMelLoss(16000, scales)
        assert float(loss(x, x)) == 0.0
        share[scales] = float(loss(x, late)) / float(loss(x, noisy))
    assert share["4-scale"] < 0.15
    assert share["7-scale"] > 3 * share["4-scale"]
    assert [(m.n_fft, m.fb.shape[0]) for m in MultiScaleMelLoss(16000, "7-scale").mels] == [
        (32, 5), (64, 10), (128, 20), (256, 40), (512, 80), (1024, 160), (2048, 320)]
    with pytest.raises(ValueError, match="unknown mel loss scales"):
        MultiScaleMelLoss(16000, "9-scale")


def test_a_run_keeps_its_mel_loss_on_resume(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(options(corpus, out, steps=2, mel_loss="7-scale"))
    train(TrainOptions(config=str(CONFIG), data=str(corpus), out=str(out), steps=4, log_every=2))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["options"]["mel_loss"] == "7-scale"
    assert all(np.isfinite(r["mel"]) for r in log_rows(out) if "mel" in r)


def test_crops_take_a_gain_from_the_runs_range(corpus: Path) -> None:
    """Clips sit at -23 dBFS; each crop's level moves by a gain drawn from ``gain_db``, so a
    wider range trains the codec on quieter and louder input."""
    from streamtok.training.data import Augmenter, SpeechCorpus

    clips = SpeechCorpus.from_folder(corpus, 16000)
    levels = {}
    for gain in [(-12.0, 6.0), (-30.0, -20.0)]:
        aug = Augmenter(clips, 16000, gain_db=gain, seed=0)  # 1 s crops of steady chirps
        crops = aug.batch(64)
        levels[gain] = 10 * np.log10(np.mean(crops.astype(np.float64) ** 2, axis=1))
    for (low, high), dbfs in levels.items():
        assert np.all(dbfs >= -23 + low - 1.5) and np.all(dbfs <= -23 + high + 0.5)
    assert levels[(-30.0, -20.0)].max() < levels[(-12.0, 6.0)].min()


def test_gain_db_flag_takes_a_range() -> None:
    from streamtok.cli import build_parser

    args = build_parser().parse_args(["train", "--config", "c", "--data", "d", "--out", "o", "--gain-db=-22,8"])
    assert args.gain_db == (-22.0, 8.0)
    assert build_parser().parse_args(["train", "--config", "c", "--data", "d", "--out", "o"]).gain_db is None
    for bad in ["8,-22", "-22", "a,b"]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--config", "c", "--data", "d", "--out", "o", f"--gain-db={bad}"])
