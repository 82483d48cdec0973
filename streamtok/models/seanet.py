"""SEANet encoder/decoder (EnCodec, Mimi) built from streaming causal convolutions."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from streamtok.streaming import StreamingConv1d, StreamingConvTranspose1d, StreamingLSTM


@dataclass
class SEANetConfig:
    """Hyper-parameters of a SEANet pair. ``ratios`` are in decoder order (the encoder
    downsamples by ``reversed(ratios)``), as in EnCodec and moshi."""

    channels: int = 1
    dimension: int = 128
    n_filters: int = 32
    ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 2])
    n_residual_layers: int = 1
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    lstm: int = 0
    true_skip: bool = True
    pad_mode: str = "constant"
    elu_alpha: float = 1.0
    # Residual blocks per decoder stage when it differs from the encoder's (None: the same). More
    # depth where the waveform is shaped, with receptive field growing as dilation_base ** j.
    decoder_residual_layers: int | None = None

    @property
    def hop_length(self) -> int:
        n = 1
        for r in self.ratios:
            n *= r
        return n

    @property
    def decoder_layers(self) -> int:
        n = self.decoder_residual_layers
        return self.n_residual_layers if n is None else n


class ResidualBlock(nn.Module):
    """``x + conv1(act(conv3_dilated(act(x))))`` with a bottleneck of ``dim // compress``."""

    def __init__(self, dim: int, cfg: SEANetConfig, dilation: int) -> None:
        super().__init__()
        hidden = dim // cfg.compress
        # The first ELU's input is also the skip's, so only the second may work in place (each
        # in-place op saves a fresh activation buffer: at batch 64 they are tens of MB).
        self.block = nn.Sequential(
            nn.ELU(cfg.elu_alpha),
            StreamingConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, pad_mode=cfg.pad_mode),
            nn.ELU(cfg.elu_alpha, inplace=True),
            StreamingConv1d(hidden, dim, 1, pad_mode=cfg.pad_mode),
        )
        self.shortcut = nn.Identity() if cfg.true_skip else StreamingConv1d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x).add_(self.shortcut(x))  # the block's output is fresh: sum in place


class SEANetEncoder(nn.Module):
    """``[B, channels, T]`` audio -> ``[B, dimension, T // hop_length]`` latents."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        mult = 1
        nf = cfg.n_filters
        layers: list[nn.Module] = [StreamingConv1d(cfg.channels, nf, cfg.kernel_size, pad_mode=cfg.pad_mode)]
        for ratio in reversed(cfg.ratios):
            for j in range(cfg.n_residual_layers):
                layers.append(ResidualBlock(mult * nf, cfg, cfg.dilation_base ** j))
            layers += [nn.ELU(cfg.elu_alpha, inplace=True),  # its input is always a fresh output
                       StreamingConv1d(mult * nf, mult * nf * 2, ratio * 2, stride=ratio, pad_mode=cfg.pad_mode)]
            mult *= 2
        if cfg.lstm:
            layers.append(StreamingLSTM(mult * nf, cfg.lstm))
        layers += [nn.ELU(cfg.elu_alpha),
                   StreamingConv1d(mult * nf, cfg.dimension, cfg.last_kernel_size, pad_mode=cfg.pad_mode)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class SEANetDecoder(nn.Module):
    """``[B, dimension, F]`` latents -> ``[B, channels, F * hop_length]`` audio.

    ``roles`` names each layer of ``model`` by what it is (``("res", stage, j)`` the ``j``-th
    residual block of upsampling stage ``stage``), so the layers of decoders that differ only in
    residual blocks per stage can be matched (see :func:`streamtok.models.weights.warm_start`).
    """

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        mult = 2 ** len(cfg.ratios)
        nf = cfg.n_filters
        layers: list[nn.Module] = [
            StreamingConv1d(cfg.dimension, mult * nf, cfg.kernel_size, pad_mode=cfg.pad_mode)]
        roles: list[tuple[object, ...]] = [("in",)]
        if cfg.lstm:
            layers.append(StreamingLSTM(mult * nf, cfg.lstm))
            roles.append(("lstm",))
        for stage, ratio in enumerate(cfg.ratios):
            layers += [nn.ELU(cfg.elu_alpha),
                       StreamingConvTranspose1d(mult * nf, mult * nf // 2, ratio * 2, stride=ratio)]
            roles += [("act", stage), ("up", stage)]
            for j in range(cfg.decoder_layers):
                layers.append(ResidualBlock(mult * nf // 2, cfg, cfg.dilation_base ** j))
                roles.append(("res", stage, j))
            mult //= 2
        layers += [nn.ELU(cfg.elu_alpha),
                   StreamingConv1d(nf, cfg.channels, cfg.last_kernel_size, pad_mode=cfg.pad_mode)]
        roles += [("act",), ("out",)]
        self.model = nn.Sequential(*layers)
        self.roles = roles

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
