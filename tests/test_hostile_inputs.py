"""What `codec.py encode` does with awkward audio (NaN, Inf, overflowing levels, silence, one
sample, clipping, hundreds of channels), and how `model.load_model` refuses a checkpoint whose
config asks for a model the machine cannot hold."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import codec
import model as model_module
from coding import file_codec
from coding.token_file import read_tokens
from model import EncodecModel, estimate_model_bytes, load_model, module_bytes
from test_codec import save_tiny_checkpoint
from utils.checkpoints import CheckpointError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from conftest import make_config

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_tiny_checkpoint(make_config(), path)
    return path


def _encode(ckpt: Path, audio: np.ndarray, tmp_path: Path, *flags: str, rate: int = 24000) -> int:
    sf.write(tmp_path / "in.wav", audio, rate, subtype="FLOAT")
    return codec.main(["encode", "--checkpoint", str(ckpt), "--device", "cpu", *flags,
                       str(tmp_path / "in.wav"), str(tmp_path / "x.tok")])


def _decode(ckpt: Path, tmp_path: Path) -> np.ndarray:
    assert codec.main(["decode", "--checkpoint", str(ckpt), "--device", "cpu",
                       str(tmp_path / "x.tok"), str(tmp_path / "y.wav")]) == 0
    return sf.read(tmp_path / "y.wav", dtype="float32", always_2d=True)[0]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def _noise(samples: int, channels: int, seed: int = 0) -> np.ndarray:
    return 0.1 * np.random.default_rng(seed).standard_normal((samples, channels)).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Encoding: a clear error or a correct result


@pytest.mark.parametrize("bad,name", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")])
@pytest.mark.parametrize("shared", [False, True])
def test_non_finite_samples_are_a_one_line_error_naming_file_and_channel(ckpt, tmp_path, capsys,
                                                                         bad, name, shared):
    audio = _noise(24000, 2)
    audio[5000:5100, 1] = bad  # 100 bad samples in channel 1 of 1 s
    flags = ("--shared-content",) if shared else ()
    assert _encode(ckpt, audio, tmp_path, *flags) == 1
    err = _one_line_error(capsys)
    assert "in.wav" in err and "channel 1" in err and "100 NaN or infinite" in err
    assert "sample 5000" in err
    assert not (tmp_path / "x.tok").exists()


@pytest.mark.parametrize("shared", [False, True])
def test_levels_whose_power_overflows_float32_are_an_error_not_infinite_scales(ckpt, tmp_path,
                                                                               capsys, shared):
    audio = _noise(2400, 2)
    audio[:, 0] *= 1e22  # finite samples, but their square is not a float32
    assert _encode(ckpt, audio, tmp_path, *(("--shared-content",) if shared else ())) == 1
    err = _one_line_error(capsys)
    assert "RMS level" in err and ("channel 0" in err or "common" in err)
    assert not (tmp_path / "x.tok").exists()


@pytest.mark.parametrize("case", ["silence", "silence shared", "one sample", "one sample 48k",
                                  "clipping", "clipping shared"])
def test_silence_one_sample_and_clipping_encode_and_decode_to_finite_audio(ckpt, tmp_path, case):
    t = np.arange(4800) / 24000
    audio = {"silence": np.zeros((4800, 2), np.float32),
             "one sample": np.full((1, 1), 0.5, np.float32),
             "clipping": np.clip(4 * np.sin(2 * np.pi * 220 * t), -1, 1)[:, None].repeat(2, 1)
             }[case.replace(" shared", "").replace(" 48k", "")].astype(np.float32)
    shared = case.endswith("shared")
    rate = 48000 if case.endswith("48k") else 24000
    assert _encode(ckpt, audio, tmp_path, *(("--shared-content",) if shared else ()),
                   rate=rate) == 0
    _, meta = read_tokens(tmp_path / "x.tok")
    assert all(np.isfinite(scale) and scale > 0 for scale in meta["scales"])
    decoded = _decode(ckpt, tmp_path)
    assert decoded.shape == audio.shape and np.isfinite(decoded).all()
    if case.startswith("silence"):
        assert np.abs(decoded).max() < 1e-6  # the RMS floor keeps silence silent
    if case.startswith("clipping"):
        assert np.abs(decoded).max() < 4  # the level of full scale, not a blow-up


def test_three_hundred_channels_encode_one_channel_per_pass(ckpt, tmp_path, monkeypatch):
    model, cfg = load_model(ckpt)
    passes = []
    model.encoder.register_forward_hook(lambda module, args, out: passes.append(args[0].shape))
    monkeypatch.setattr(file_codec, "load_model", lambda *args, **kwargs: (model, cfg))
    audio = _noise(480, 300)
    assert _encode(ckpt, audio, tmp_path) == 0
    codes, meta = read_tokens(tmp_path / "x.tok")
    assert codes.shape[0] == meta["channels"] == 300
    assert len(passes) == 300 and all(shape[0] == 1 for shape in passes)
    decoded = _decode(ckpt, tmp_path)
    assert decoded.shape == (480, 300) and np.isfinite(decoded).all()


def test_rates_sharing_almost_no_factor_are_refused_before_resampling(ckpt, tmp_path, capsys):
    # 44101 Hz against the model's 24 kHz: a 17 GB resampling filter.
    assert _encode(ckpt, _noise(441, 1), tmp_path, rate=44101) == 1
    err = _one_line_error(capsys)
    assert "resampling 44101 Hz to 24000 Hz" in err and "GB filter" in err


# ----------------------------------------------------------------------------------------
# Checkpoints asking for an absurd model


def _checkpoint_with(ckpt: Path, path: Path, **model_settings) -> Path:
    loaded = torch.load(ckpt, weights_only=True)
    loaded["config"]["model"].update(model_settings)
    torch.save(loaded, path)
    return path


def test_the_estimate_counts_what_building_the_model_allocates(cfg_factory):
    cfg = cfg_factory(overrides=["model.n_q=20", "model.lstm=20", "model.residual_layers=18"])
    with torch.device("meta"):
        built = module_bytes(EncodecModel.from_config(cfg.model))
    assert estimate_model_bytes(cfg.model) == built  # extrapolated above 16 of a kind
    small = cfg_factory().model
    assert estimate_model_bytes(small) == module_bytes(EncodecModel.from_config(small))


@pytest.mark.parametrize("settings", [{"filters": 1_000_000_000}, {"dimension": 10**7},
                                      {"lstm": 10**9}, {"n_q": 10**9, "bins": 65536}])
def test_an_absurd_model_is_refused_before_it_is_built(ckpt, tmp_path, capsys, monkeypatch,
                                                       settings):
    absurd = _checkpoint_with(ckpt, tmp_path / "absurd.pt", **settings)
    real_init = EncodecModel.__init__  # the estimate builds on the meta device: allowed

    @functools.wraps(real_init)
    def guarded(self, *args, **kwargs):
        assert torch.empty(0).device.type == "meta", "the model was built for real"
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(EncodecModel, "__init__", guarded)
    with pytest.raises(CheckpointError, match=r"absurd\.pt: .*(GB of parameters|cannot be built)"):
        load_model(absurd)
    sf.write(tmp_path / "in.wav", _noise(2400, 1), 24000, subtype="FLOAT")
    assert codec.main(["encode", "--checkpoint", str(absurd), "--device", "cpu",
                       str(tmp_path / "in.wav"), str(tmp_path / "x.tok")]) == 1
    err = _one_line_error(capsys)
    assert "absurd.pt" in err and "GB" in err


def test_the_refusal_compares_with_the_memory_free_on_the_device(ckpt, monkeypatch):
    needed = sum(estimate_model_bytes(torch.load(ckpt, weights_only=True)["config"]["model"]))
    def free(device):
        return needed - 1 if torch.device(device).type == "cuda" else 1 << 40

    monkeypatch.setattr(model_module, "available_memory_bytes", free)
    load_model(ckpt)  # fits the CPU
    with pytest.raises(CheckpointError, match=r"tiny\.pt: .* GB of parameters .* free on cuda"):
        model_module.check_model_fits(ckpt, torch.load(ckpt, weights_only=True)["config"]["model"],
                                      "cuda")
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda device: needed - 1)
    with pytest.raises(CheckpointError, match="free on cpu"):
        load_model(ckpt)


def test_cuda_memory_is_read_from_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123, 456))
    assert model_module.available_memory_bytes("cuda:0") == 123
    assert model_module.available_memory_bytes("cpu") > 0
