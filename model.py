"""EnCodec 24 kHz: SEANet encoder/decoder around a residual vector quantizer.

One forward contract in train and eval mode (`EncodecOutput`), per-codebook embeddings with a
gradient into the encoder for every codebook, and loading of the official 24 kHz checkpoint.
"""
from __future__ import annotations

import inspect
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from utils import checkpoints as ckpt_io
from modules.seanet import SEANetDecoder, SEANetEncoder
from modules.quantization import EuclideanCodebook, ResidualVectorQuantizer

# Official 24 kHz EnCodec: causal, weight norm, no audio normalisation (its other
# hyper-parameters are this class's defaults).
OFFICIAL_24KHZ = dict(causal=True, norm="weight_norm", audio_normalize=False)
_LEGACY_WEIGHT_NORM = re.compile(r"^(.*)\.weight_([gv])$")
_OFFICIAL_CODEBOOK = re.compile(r"^quantizer\.vq\.layers\.(\d+)\.")


@dataclass
class EncodecOutput:
    """Result of `EncodecModel.forward`.

    Attributes:
        audio: `[B, C, T]` reconstruction, same length as the input.
        commit_loss: scalar commitment loss (sum over codebooks).
        codes: `[B, n_q, F]` long, `F = ceil(T / hop)`; the codes that were decoded.
        embeddings: None unless asked; else `n_q` tensors `[B, D, F]`, codebook k's chosen
            vectors with a straight-through gradient into the encoder (in training mode, the
            vectors before this step's EMA update, i.e. the ones that were decoded).
        commit_per_item: `[B]` commitment loss of each item (its mean is `commit_loss`), so
            that a batch of several channel views can report one value per channel.
        latent: `[B, D, F]` the encoder output (with its graph), before `content_views`
            shares its content part across views: what each view's own codebook 1 would code
            alone (the code consensus term's input), and where the training step compares the
            gradients of its loss terms.
    """
    audio: torch.Tensor
    commit_loss: torch.Tensor
    codes: torch.Tensor
    embeddings: list[torch.Tensor] | None = None
    commit_per_item: torch.Tensor | None = None
    latent: torch.Tensor | None = None


class EncodecModel(nn.Module):
    """EnCodec model on the raw waveform.

    Args:
        sample_rate (int): Audio sample rate.
        channels (int): Audio channels.
        n_q (int): Codebooks.
        bins (int): Codes per codebook.
        dimension (int): Latent dimension.
        target_bandwidths (list of float): Bandwidths (kbps) the model can be used at, as in
            EnCodec: each selects the first codebooks that fit in it
            (`codebooks_for_bandwidth`); at or above `bandwidth` that is all `n_q`.
        filters (int): SEANet base width.
        ratios (list of int): Decoder up-sampling ratios (hop = their product).
        residual_layers (int): Residual blocks per resolution.
        lstm (int): LSTM layers in encoder and decoder.
        causal (bool): Causal convolutions.
        norm (str): 'weight_norm' or 'time_group_norm' (non-causal only) or 'none'.
        audio_normalize (bool): Divide the input by its RMS (+eps) and multiply the output back.
        ema_decay (float): Codebook EMA decay.
        epsilon (float): Codebook Laplace smoothing.
        kmeans_iters (int): k-means iterations of the codebook init.
        dead_code_threshold (float): EMA count below which a code is replaced (0 disables).
        kmeans_buffer (float): Each codebook's k-means runs on `kmeans_buffer x bins` vectors
            gathered over training forwards, codebook after codebook (0: the first batch).
        content_share (float): 0, or the share of the latent dimensions that codebook 1 alone
            quantizes (codebook 2 the others): `ResidualVectorQuantizer(content_dims=...)`.
    """

    # Floor of the RMS used for audio normalisation: silence gives a finite scale and gradient.
    normalize_eps: float = 1e-8

    def __init__(self, sample_rate: int = 24_000, channels: int = 1, n_q: int = 2,
                 bins: int = 1024, dimension: int = 128,
                 target_bandwidths: Sequence[float] = (1.5, 3.0, 6.0, 12.0, 24.0),
                 filters: int = 32, ratios: Sequence[int] = (8, 5, 4, 2),
                 residual_layers: int = 1, lstm: int = 2, causal: bool = True,
                 norm: str = "weight_norm", audio_normalize: bool = True,
                 ema_decay: float = 0.99, epsilon: float = 1e-5, kmeans_iters: int = 50,
                 dead_code_threshold: float = 2, kmeans_buffer: float = 10,
                 content_share: float = 0.0):
        super().__init__()
        if not 0.0 <= content_share < 1.0:
            raise ValueError(f"model.content_share must be in [0, 1), got {content_share}.")
        seanet = dict(channels=channels, dimension=dimension, n_filters=filters,
                      n_residual_layers=residual_layers, ratios=tuple(ratios), norm=norm,
                      causal=causal, lstm=lstm)
        self.encoder = SEANetEncoder(**seanet)
        self.quantizer = ResidualVectorQuantizer(
            dimension=dimension, n_q=n_q, bins=bins, decay=ema_decay, epsilon=epsilon,
            kmeans_init=True, kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=dead_code_threshold, kmeans_buffer=kmeans_buffer,
            content_dims=round(content_share * dimension))
        self.decoder = SEANetDecoder(**seanet)
        self._sample_rate = int(sample_rate)
        self.channels = channels
        self.audio_normalize = audio_normalize
        self.hop_length = self.encoder.hop_length
        self._frame_rate = math.ceil(self._sample_rate / self.hop_length)
        self.target_bandwidths = sorted(float(bw) for bw in target_bandwidths)
        if not self.target_bandwidths or self.target_bandwidths[0] <= 0:
            raise ValueError(f"target_bandwidths must be positive kbps values, "
                             f"got {list(target_bandwidths)}")

    # ---------------------------------------------------------------- properties
    @property
    def sample_rate(self) -> int:
        """Audio sample rate (Hz)."""
        return self._sample_rate

    @property
    def frame_rate(self) -> int:
        """Latent frames per second (75 at 24 kHz with hop 320)."""
        return self._frame_rate

    @property
    def n_q(self) -> int:
        """Number of codebooks."""
        return self.quantizer.n_q

    @property
    def bandwidth_per_codebook(self) -> float:
        """kbps carried by one codebook."""
        return math.log2(self.quantizer.bins) * self.frame_rate / 1000

    @property
    def bandwidth(self) -> float:
        """kbps of the codes this model produces (all `n_q` codebooks)."""
        return self.n_q * self.bandwidth_per_codebook

    @property
    def codebooks_initialized(self) -> bool:
        """True once every codebook has run its final k-means (the same on every rank)."""
        return self.quantizer.initialized

    @property
    def kmeans_progress(self) -> list[float]:
        """Per codebook, the fraction of its k-means buffer gathered (1.0: initialised)."""
        return self.quantizer.kmeans_progress

    def codebooks_for_bandwidth(self, bandwidth: float) -> int:
        """Number of codebooks to encode and decode with at `bandwidth` kbps, one of
        `target_bandwidths`: as many as fit (at least 1), at most `n_q` (EnCodec's rule)."""
        if float(bandwidth) not in self.target_bandwidths:
            raise ValueError(f"bandwidth {bandwidth} kbps is not one of model.target_bandwidths "
                             f"{self.target_bandwidths}")
        fitting = math.floor(float(bandwidth) / self.bandwidth_per_codebook + 1e-9)
        return min(self.n_q, max(1, fitting))

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, return_embeddings: bool = False,
                scale: torch.Tensor | None = None, content_views: int = 1) -> EncodecOutput:
        """Encode, quantize (updating the codebooks once in training mode) and decode.

        Args:
            x: waveform `[B, channels, T]`.
            return_embeddings: also return the per-codebook embeddings.
            scale: `[B, 1, 1]` normalisation scale to use instead of each item's RMS, e.g.
                `shared_scale(x, views)` for the channels of a pair; the output is restored
                with it. Only with audio normalisation.
            content_views: V > 1: the rows are V views of each segment (`flatten_views`)
                and codebook 1 codes their mean content latent once per segment, each view
                decoding it with its own codebook 2 (`ResidualVectorQuantizer.share_content`;
                split quantizer only).
        """
        self._check_audio(x)
        x_normalized, scale = self.normalize(x, scale)
        latent = self.encoder(x_normalized)
        coded = (self.quantizer.share_content(latent, content_views) if content_views > 1
                 else latent)
        q = self.quantizer(coded, return_embeddings=return_embeddings)
        audio = self._restore(self.decoder(q.quantized), scale, x.shape[-1])
        return EncodecOutput(audio=audio, commit_loss=q.commit_loss, codes=q.codes,
                             embeddings=q.embeddings, commit_per_item=q.commit_per_item,
                             latent=latent)

    def encode(self, x: torch.Tensor, return_scale: bool = False,
               scale: torch.Tensor | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Codes `[B, n_q, F]` of waveform `x` `[B, channels, T]`.

        With `return_scale`, returns `(codes, scale)` where `scale` `[B, 1, 1]` is the RMS the
        input was divided by (None when audio normalisation is off); pass it to `decode`.
        A given `scale` `[B, 1, 1]` (e.g. `shared_scale`) replaces each item's RMS.
        """
        self._check_audio(x)
        x_normalized, scale = self.normalize(x, scale)
        codes = self.quantizer.encode(self.encoder(x_normalized))
        return (codes, scale) if return_scale else codes

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None = None,
               length: int | None = None) -> torch.Tensor:
        """Waveform `[B, channels, length or F * hop]` of `codes` `[B, K, F]` (K <= n_q).

        Args:
            codes: codes from `encode` (the first K codebooks decode at a lower bandwidth).
            scale: the scale returned by `encode(..., return_scale=True)`, or None.
            length: trim the output to this many samples (the input length).
        """
        audio = self.decoder(self.quantizer.decode(codes))
        return self._restore(audio, scale, length)

    def normalize(self, x: torch.Tensor, scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(x / scale, scale)` with `scale` `[B, 1, 1]` the input's RMS (+eps) or the `scale`
        given, or `(x, None)` without audio normalisation: what the encoder sees and what
        decoding restores."""
        if not self.audio_normalize:
            if scale is not None:
                raise ValueError("a normalisation scale was given but this model does not "
                                 "normalise audio (audio_normalize=False): pass scale=None.")
            return x, None
        if scale is None:
            scale = self._rms(self._power(x))
        elif scale.shape != (x.shape[0], 1, 1):
            raise ValueError(f"scale must have shape [B, 1, 1] = {(x.shape[0], 1, 1)}, got "
                             f"{tuple(scale.shape)}.")
        return x / scale, scale

    @classmethod
    def shared_scale(cls, x: torch.Tensor, views: int) -> torch.Tensor:
        """One normalisation scale per group of `views` consecutive items: their common RMS.

        For a batch flattened view-major inside items (`[B*V, C, T]`: item 0 view 0, item 0
        view 1, ..., item 1 view 0, ...), returns `[B*V, 1, 1]`: the square root of the mean
        power over the V views of each item (same eps rule as `normalize`), repeated for its V
        members. Dividing by it keeps the level differences between the views of an item,
        which per-view scales erase.
        """
        if x.dim() != 3 or views < 1 or x.shape[0] % views:
            raise ValueError(f"expected [B*V, C, T] with B*V a multiple of views={views}, got "
                             f"shape {tuple(x.shape)}.")
        power = cls._power(x).view(-1, views).mean(dim=1)
        return cls._rms(power).repeat_interleave(views).view(-1, 1, 1)

    @staticmethod
    def _power(x: torch.Tensor) -> torch.Tensor:
        """`[B, 1, 1]` mean power of each item (of its channels' mean)."""
        return x.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True)

    @classmethod
    def _rms(cls, power: torch.Tensor) -> torch.Tensor:
        """Scale of a mean power: sqrt(power + eps^2) rather than EnCodec's eps + sqrt(power),
        the same for any audible input but smooth at zero, so silence gives a finite gradient
        instead of NaN."""
        return (power + cls.normalize_eps ** 2).sqrt()

    @staticmethod
    def _restore(audio: torch.Tensor, scale: torch.Tensor | None,
                 length: int | None) -> torch.Tensor:
        if length is not None:
            audio = audio[..., :length]
        if scale is not None:
            audio = audio * scale.reshape(-1, 1, 1)
        return audio

    def _check_audio(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"expected a waveform [B, {self.channels}, T] "
                             f"(channels={self.channels}), got shape {tuple(x.shape)}; "
                             f"add a channel dimension with x.unsqueeze(1) for [B, T] input.")
        if x.shape[-1] == 0:
            raise ValueError("cannot encode an empty waveform (T = 0).")

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> "EncodecModel":
        """Build from the Hydra `model` group (see config/base.yaml).

        If `init_from` is set, the weights at that path are loaded: a checkpoint of this
        toolkit (a training checkpoint or an exported start point such as
        `pretrained/*.pt`; its generator must fit this config, apart from its number of
        codebooks: the first `n_q` are kept, and codebooks it lacks start empty, to be fitted by
        k-means in the first training steps), or the official EnCodec 24 kHz state dict (first
        `n_q` codebooks kept; the config's other keys still apply).
        """
        kwargs = {key: _plain(value) for key, value in model_cfg.items()}
        init_from = kwargs.pop("init_from", None)
        unknown = sorted(set(kwargs) - set(_init_keys()))
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; "
                             f"EncodecModel accepts {sorted(_init_keys())} and init_from.")
        if not init_from:
            return cls(**kwargs)
        path = Path(init_from).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.init_from={str(init_from)!r}: no such file. Point it "
                                    "to an official EnCodec 24 kHz state dict "
                                    "(e.g. encodec_24khz-d7cc33bc.th) or set it to null.")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not is_toolkit_checkpoint(loaded):
            return cls.from_official_state_dict(loaded, **kwargs)
        model = cls(**kwargs)
        try:
            # A start point may hold more codebooks than this run codes with: the first n_q
            # (a one-codebook model fine-tuned from a two-codebook start point). It may hold
            # fewer: the codebooks it lacks start empty and run their own k-means on the
            # residual the start point's codebooks leave (a third codebook for the channel).
            start = convert_official_state_dict(loaded["model"], model.n_q, allow_fewer=True)
            fresh = model.state_dict()
            start.update({key: fresh[key] for key in fresh
                          if _OFFICIAL_CODEBOOK.match(key) and key not in start})
            model.load_state_dict(start)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"model.init_from={str(init_from)!r}: its generator does not fit the "
                             f"model.* settings of this run ({error}); use the settings it was "
                             "trained with (its 'config' entry).") from error
        return model

    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor], n_q: int = 2,
                                 **overrides: Any) -> "EncodecModel":
        """Build a model holding the official EnCodec 24 kHz weights and its first `n_q` codebooks.

        Args:
            state_dict: official checkpoint (legacy `weight_g` / `weight_v` weight-norm keys,
                codebooks `quantizer.vq.layers.K._codebook.*`); a state dict of this class loads
                too.
            n_q: codebooks to keep.
            **overrides: constructor arguments that differ from the official model (whose
                architecture is causal, weight norm, no audio normalisation).
        """
        converted = convert_official_state_dict(state_dict, n_q)
        model = cls(n_q=n_q, **{**OFFICIAL_24KHZ, **overrides})
        missing, unexpected = _key_mismatch(model.state_dict(), converted)
        # Our k-means buffers are not in EnCodec's checkpoints; the codebooks default them.
        missing = [key for key in missing
                   if key.rsplit(".", 1)[-1] not in EuclideanCodebook.OPTIONAL_BUFFERS]
        if missing or unexpected:
            raise ValueError(
                "the state dict does not match an EnCodec model with this architecture "
                f"(n_q={n_q}, overrides={overrides}); missing keys: {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected keys: {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}. Is it the 24 kHz model, with the "
                "matching filters/dimension/lstm/norm settings?")
        try:
            model.load_state_dict(converted)
        except RuntimeError as error:  # same keys, different shapes
            raise ValueError(f"the state dict's tensor shapes do not match this architecture "
                             f"(n_q={n_q}, overrides={overrides}): {error}") from error
        return model


def is_toolkit_checkpoint(loaded: Any) -> bool:
    """A checkpoint written by this toolkit (generator weights under 'model', the training
    config under 'config'), as opposed to a bare official EnCodec state dict."""
    return isinstance(loaded, Mapping) and "model" in loaded and "config" in loaded


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor], n_q: int,
                                allow_fewer: bool = False) -> dict[str, torch.Tensor]:
    """Map official keys onto this model's: legacy weight norm -> parametrizations, and keep
    codebooks `0 .. n_q - 1` only. Raises if the checkpoint has fewer than `n_q` codebooks,
    unless `allow_fewer` (the caller then supplies the missing ones)."""
    converted: dict[str, torch.Tensor] = {}
    available = set()
    for key, value in state_dict.items():
        codebook = _OFFICIAL_CODEBOOK.match(key)
        if codebook:
            available.add(int(codebook.group(1)))
            if int(codebook.group(1)) >= n_q:
                continue
        legacy = _LEGACY_WEIGHT_NORM.match(key)
        if legacy:
            original = "original0" if legacy.group(2) == "g" else "original1"
            key = f"{legacy.group(1)}.parametrizations.weight.{original}"
        converted[key] = value
    if available and len(available) < n_q and not allow_fewer:
        raise ValueError(f"n_q={n_q} codebooks requested but the checkpoint holds only "
                         f"{len(available)}.")
    return converted


def _key_mismatch(expected: Mapping[str, Any],
                  given: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def _init_keys() -> list[str]:
    return [name for name in inspect.signature(EncodecModel.__init__).parameters
            if name != "self"]


def _plain(value: Any) -> Any:
    """OmegaConf containers -> Python lists/dicts, so the model holds no config objects."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


# Parameters and buffers grow linearly with these counts (every codebook, LSTM layer and
# residual block of a stage has the same size). Above the largest built count the estimate
# builds 2 and 3 of each and extrapolates: thousands of modules, even on the meta device,
# take minutes to build.
_LINEAR_COUNTS = ("n_q", "lstm", "residual_layers")
_LARGEST_BUILT_COUNT = 16


def module_bytes(module: nn.Module) -> tuple[int, int]:
    """`(parameter bytes, buffer bytes)` of `module`, on any device (the meta device too)."""
    return (sum(p.numel() * p.element_size() for p in module.parameters()),
            sum(b.numel() * b.element_size() for b in module.buffers()))


def estimate_model_bytes(model_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """`(parameter bytes, buffer bytes)` of the model a `model` config group describes,
    without allocating it: built on the meta device (shapes only, no memory, no compute),
    `init_from` ignored. Raises what building it raises (a RuntimeError when a tensor's size
    overflows)."""
    kwargs = {key: _plain(value) for key, value in model_cfg.items() if key != "init_from"}

    def built(**counts: int) -> tuple[int, int]:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # the real build reports config warnings once
            return module_bytes(EncodecModel.from_config({**kwargs, **counts}))

    large = {key: kwargs[key] for key in _LINEAR_COUNTS
             if isinstance(kwargs.get(key), int) and kwargs[key] > _LARGEST_BUILT_COUNT}
    if not large:
        return built()
    base_counts = {key: 2 for key in large}
    params, buffers = base = built(**base_counts)
    for key, count in large.items():
        step = built(**{**base_counts, key: 3})
        params += (count - 2) * (step[0] - base[0])
        buffers += (count - 2) * (step[1] - base[1])
    return params, buffers


def available_memory_bytes(device: str | torch.device) -> int | None:
    """Bytes free for new tensors on `device`: the CUDA device's free memory, or the
    machine's available RAM (Linux `MemAvailable`); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":  # without CUDA, moving the model there reports it
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_fits(checkpoint_path: str | Path, model_cfg: Mapping[str, Any],
                     device: str | torch.device) -> None:
    """Raise CheckpointError when the model a checkpoint's config describes cannot be built
    or would not fit in the memory free on the CPU (where it is built) or on `device`."""
    try:
        needed = sum(estimate_model_bytes(model_cfg))
    except RuntimeError as error:
        if "overflow" not in str(error):
            raise _unbuildable(checkpoint_path, error) from error
        needed = 1 << 63  # one tensor alone has more bytes than a 64-bit size counts
    except Exception as error:  # whatever the config holds: a one-line refusal
        raise _unbuildable(checkpoint_path, error) from error
    for where in dict.fromkeys([torch.device("cpu"), torch.device(device)]):
        available = available_memory_bytes(where)
        if available is not None and needed > available:
            raise ckpt_io.CheckpointError(
                f"{checkpoint_path}: its config describes a model of about {needed / 1e9:.3g} "
                f"GB of parameters and buffers, more than the {available / 1e9:.3g} GB free on "
                f"{where}; refusing to build it (a corrupt config, or a machine too small).")


def _unbuildable(checkpoint_path: str | Path, error: Exception) -> ckpt_io.CheckpointError:
    return ckpt_io.CheckpointError(
        f"{checkpoint_path}: the model its config describes cannot be built "
        f"({' '.join(str(error).split())[:200]}); the checkpoint is corrupt.")


def load_model(checkpoint_path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[EncodecModel, DictConfig]:
    """Build the generator of a training checkpoint, in eval mode on `device`.

    Returns `(model, cfg)` with `cfg` the resolved training config stored in the checkpoint.
    The model is refused before it is built when it would not fit (`check_model_fits`).
    """
    ckpt = ckpt_io.load_checkpoint(checkpoint_path, map_location="cpu")
    cfg = OmegaConf.create(ckpt["config"])
    model_cfg = _without_init_from(cfg.model)
    check_model_fits(checkpoint_path, model_cfg, device)
    model = EncodecModel.from_config(model_cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        raise RuntimeError(f"{checkpoint_path}: weights do not match the model its own config "
                           f"describes ({error}); the checkpoint is inconsistent.") from error
    return model.to(device).eval(), cfg


def _without_init_from(model_cfg: DictConfig) -> DictConfig:
    # The trained weights replace the initialisation, and its file may not exist here.
    model_cfg = model_cfg.copy()
    OmegaConf.set_struct(model_cfg, False)
    model_cfg.init_from = None
    return model_cfg
