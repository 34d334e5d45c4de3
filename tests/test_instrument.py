"""The fair paired-channel instrument end to end through `validation.measure_batch`
and `MetricAccumulator`: one scale per pair, swap gain, ILD / ITD fidelity, the
agreement ceiling, the probes' wiring, and the per-epoch validation's logged names.

Most cases use `FramedCodec`, a hand-built "codec" whose latent IS the normalised waveform
cut into frames, so that what each codebook holds, and therefore the right answer, is
exact."""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import nn

from measure import metrics, pair_cues
from measure.accumulator import InstrumentSettings, MetricAccumulator
from measure.results import flatten_metrics
from modules import spatial_cues
from utils import eigenscape
from model import EncodecModel, EncodecOutput
from training.validation import accumulate, evaluate_model, measure_batch

HOP = 320
RATE = 24000
LENGTH = 30 * HOP  # 0.4 s, long enough for every cue
SEPARATED = [0, 16]  # em32 capsules 138 degrees apart
CLOSE = [0, 1]       # 38 degrees apart


def frames(wave: torch.Tensor) -> torch.Tensor:
    """`[N, 1, F * HOP]` -> latent `[N, HOP, F]`."""
    return wave.reshape(wave.shape[0], -1, HOP).transpose(1, 2)


def unframe(latent: torch.Tensor) -> torch.Tensor:
    """Latent `[N, HOP, F]` -> `[N, 1, F * HOP]`."""
    return latent.transpose(1, 2).reshape(latent.shape[0], 1, -1)


class FramedCodec(nn.Module):
    """A 'codec' with `EncodecModel`'s interface whose latent is the normalised waveform in
    frames of HOP samples and whose decoder is the inverse, so that decoding the sum of the
    embeddings gives back the normalised input exactly.

    `split(latent) -> [emb_1, emb_2]` (summing to the latent) says what each codebook holds.
    `decoder` may be replaced (e.g. by one that ignores the latent). A frame's code is its
    embedding's level in steps of 1 dB: equal embeddings give equal codes (up to float
    rounding, far below a step), and a 0.5 dB gain moves about half of them.
    """
    audio_normalize = True
    sample_rate = RATE
    frame_rate = RATE // HOP
    n_q = 2
    bins = 1 << 20

    def __init__(self, split: Callable[[torch.Tensor], list[torch.Tensor]],
                 decoder: Callable[[torch.Tensor], torch.Tensor] = unframe):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.split, self.decoder = split, decoder

    def normalize(self, x, scale=None):
        if scale is None:
            scale = EncodecModel._rms(EncodecModel._power(x))
        return x / scale, scale

    def embeddings(self, x, scale):
        x_normalized, scale = self.normalize(x, scale)
        return self.split(frames(x_normalized)), scale

    def codes(self, embeddings):
        level_db = lambda e: 10 * torch.log10(e.double().pow(2).mean(dim=1) + 1e-30)  # noqa: E731
        return torch.stack([torch.floor(level_db(e)).long() % self.bins for e in embeddings], dim=1)

    def forward(self, x, return_embeddings=False, scale=None):
        embeddings, scale = self.embeddings(x, scale)
        audio = self.decoder(sum(embeddings))[..., :x.shape[-1]] * scale
        return EncodecOutput(audio=audio, commit_loss=torch.zeros(()), codes=self.codes(embeddings),
                             embeddings=embeddings if return_embeddings else None)

    def encode(self, x, scale=None):
        return self.codes(self.embeddings(x, scale)[0])


def everything_in_codebook_1(latent):
    return [latent, torch.zeros_like(latent)]


def lowpass(wave: torch.Tensor, cutoff_hz: float = 1000.0) -> torch.Tensor:
    spectrum = torch.fft.rfft(wave, dim=-1)
    freqs = torch.fft.rfftfreq(wave.shape[-1], 1 / RATE)
    return torch.fft.irfft(spectrum * (freqs < cutoff_hz), n=wave.shape[-1], dim=-1)


def low_band_in_codebook_1(latent):
    """Codebook 1: the signal below 1 kHz; codebook 2: the rest."""
    low = frames(lowpass(unframe(latent)))
    return [low, latent - low]


def pair_batches(x_a: torch.Tensor, x_b: torch.Tensor, channels=SEPARATED, files: int = 4,
                 batch: int = 4):
    """Batches `(wavs [B, 2, 1, T], metas)` of the pairs (x_a[i], x_b[i]), item i from file i %
    files."""
    wavs = torch.stack([x_a, x_b], dim=1)
    out = []
    for start in range(0, len(wavs), batch):
        metas = [{"path": f"file{i % files}.wav", "class": "Woodland", "channels": list(channels),
                  "start": i}
                 for i in range(start, min(start + batch, len(wavs)))]
        out.append((wavs[start:start + batch], metas))
    return out


def noise(n: int, seed: int, length: int = LENGTH) -> torch.Tensor:
    return torch.randn(n, 1, length, generator=torch.Generator().manual_seed(seed))


def measure(model, batches, **kwargs) -> dict:
    results, _ = evaluate_model(model, model.bins if hasattr(model, "bins") else 32, batches,
                                content_codebook=0, keep_examples=0, capsules=eigenscape.CAPSULES,
                                **kwargs)
    return results


# -- swap gain ----------------------------------------------------------------------------

def test_swap_gain_is_one_when_codebook_1_is_shared_and_codebook_2_holds_the_channel():
    """Both channels share the low band exactly and differ above 1 kHz (B's high band 6 dB
    louder plus its own noise): codebook 1 (the low band) is identical across the channels,
    so codebook 1 of A with codebook 2 of B is x_B itself."""
    low, high_a, high_b = lowpass(noise(12, 0)), noise(12, 1), noise(12, 2)
    x_a = low + (high_a - lowpass(high_a))
    x_b = low + 2.0 * ((0.6 * high_a + 0.8 * high_b) - lowpass(0.6 * high_a + 0.8 * high_b))
    results = measure(FramedCodec(low_band_in_codebook_1), pair_batches(x_a, x_b))
    assert results["codebook_agreement"][0] == 1.0 and results["codebook_agreement"][1] < 0.3
    assert (results["swap_n_used"] == 12 and results["swap_n_degenerate"] == 0
            and results["swap_n_groups"] == 4)
    assert results["swap_gain"] == pytest.approx(1.0, abs=1e-4)
    assert results["swap_gain_ci"] == pytest.approx([1.0, 1.0], abs=1e-4)
    assert (results["swap_separation_db"] > 1.0
            and results["swap_separation_ratio"] == pytest.approx(1.0, abs=1e-4))
    assert results["swap_mel_to_b"] == pytest.approx(0.0, abs=1e-3)
    assert results["swap_mel_to_a"] > 0.1
    assert results["swap_rec_b_mel_to_b"] == pytest.approx(0.0, abs=1e-3)


def test_swap_gain_is_zero_when_codebook_2_is_zero():
    """Codebook 2 adds nothing: the swap is A's decode, whatever the channels are."""
    x_a, x_b = noise(8, 3), 0.5 * lowpass(noise(8, 4), 4000.0) + 0.1 * noise(8, 5)
    results = measure(FramedCodec(everything_in_codebook_1), pair_batches(x_a, x_b))
    assert results["swap_n_used"] == 8
    assert results["swap_gain"] == pytest.approx(0.0, abs=1e-6)
    assert results["swap_mel_to_a"] == pytest.approx(0.0, abs=1e-3)


def test_swap_gain_of_a_real_model_with_codebook_2_zeroed_is_zero(cfg_factory):
    torch.manual_seed(0)
    cfg = cfg_factory()
    model = EncodecModel.from_config(cfg.model)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, LENGTH))  # k-means init
        model.quantizer.codebooks[1].embed.zero_()
    model.eval()
    x_a, x_b = noise(8, 6), 0.3 * noise(8, 7) + lowpass(noise(8, 8), 2000.0)
    results = measure(model, pair_batches(x_a, x_b))
    assert results["swap_n_used"] > 0
    assert results["swap_gain"] == pytest.approx(0.0, abs=1e-3)


def test_a_swap_that_only_follows_the_input_level_does_not_score_as_channel_transfer():
    """The loudness confound. B is A 6 dB louder, and the codec holds everything (level
    included) in codebook 1: codebook 2 of B carries nothing of B. Restored at B's own
    level, as the old swap test did, the swap would be x_B exactly (gain 1, computed below);
    at the pair's one scale it is A's decode: gain 0."""
    x_a = noise(8, 9)
    x_b = 2.0 * x_a
    model = FramedCodec(everything_in_codebook_1)
    results = measure(model, pair_batches(x_a, x_b))
    assert results["swap_n_used"] == 8
    assert results["swap_gain"] == pytest.approx(0.0, abs=1e-6)

    # The confound this guards against: per-channel scales, swap restored at B's level.
    (emb_a, scale_a), (_, scale_b) = model.embeddings(x_a, None), model.embeddings(x_b, None)
    old_swap = unframe(emb_a[0] + 0) * scale_b
    level = lambda w: pair_cues.segment_band_levels(w, RATE)  # noqa: E731
    old_gain = spatial_cues.swap_gain(level(old_swap), level(x_a), level(x_b))
    assert old_gain.mean().item() == pytest.approx(1.0, abs=1e-4)


class SplitFramedCodec(FramedCodec):
    """`FramedCodec` with a split quantizer: codebook 1 holds the first `dims` samples of
    each frame, codebook 2 the rest (what `content_dims` does to the latent). It has learned
    nothing: its swap is the dimension swap of its latent."""

    def __init__(self, dims: int):
        mask = (torch.arange(HOP) < dims).float()[None, :, None]
        super().__init__(lambda latent: [latent * mask, latent * (1 - mask)])
        self.quantizer = type("Quantizer", (), {"content_dims": dims})()


class UnsplitLatent(nn.Module):
    """The null model of `SplitFramedCodec`: the same latent and decoder, no quantizer."""
    audio_normalize = True
    normalize = FramedCodec.normalize

    @staticmethod
    def encoder(x):
        return frames(x)

    @staticmethod
    def decoder(latent):
        return unframe(latent)


def test_a_split_that_learned_nothing_scores_zero_once_normalised():
    """Half of each frame from B moves the swap part of the way to B by dimension counting
    alone; against the null of an unsplit latent swapped at the same split, nothing is left."""
    x_a, x_b = noise(8, 30), 0.4 * lowpass(noise(8, 31), 3000.0) + 0.1 * noise(8, 32)
    results = measure(SplitFramedCodec(HOP // 2), pair_batches(x_a, x_b),
                      null_model=UnsplitLatent())
    assert results["swap_gain"] > 0.1                       # the raw gain counts dimensions
    assert results["swap_gain_null"] == pytest.approx(results["swap_gain"], abs=1e-6)
    assert results["swap_gain_normalized"] == pytest.approx(0.0, abs=1e-5)
    assert results["swap_gain_shape_normalized"] == pytest.approx(0.0, abs=1e-5)
    flat = flatten_metrics(results)
    assert flat["swap_gain_normalized"] == pytest.approx(0.0, abs=1e-5)


def test_a_split_model_without_a_null_model_says_so_and_an_unsplit_one_has_null_zero():
    x_a, x_b = noise(8, 33), 0.5 * noise(8, 34)
    split = measure(SplitFramedCodec(HOP // 2), pair_batches(x_a, x_b))
    assert split["swap_gain_null"] is None and split["swap_gain_normalized"] is None
    assert "null model" in split["swap_null_note"]
    unsplit = measure(FramedCodec(low_band_in_codebook_1), pair_batches(x_a, x_b))
    assert unsplit["swap_gain_null"] == 0.0
    assert unsplit["swap_gain_normalized"] == unsplit["swap_gain"]


def shape_in_codebook_1_level_in_codebook_2(latent):
    """One latent row more than the frame: codebook 1 holds the item's waveform at unit RMS
    (its content and spectral shape), codebook 2 only its RMS, in the extra row."""
    rms = latent.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    zero_row = torch.zeros_like(latent[:, :1])
    return [torch.cat([latent / rms, zero_row], dim=1),
            torch.cat([torch.zeros_like(latent), rms.expand_as(zero_row)], dim=1)]


def decode_shape_at_level(latent):
    return unframe(latent[:, :HOP]) * latent[:, HOP:].mean(dim=2, keepdim=True)


def test_a_codebook_2_that_holds_only_loudness_scores_zero_on_the_shape():
    """B is A 12 dB down plus its own low band: another level and another spectral shape. A
    codec whose codebook 2 carries only the level swaps A's sound to B's loudness: a broadband
    swap gain near the loudness-only fake's (which shifts by the mean dB over bands, where
    this codec matches the RMS), and none on the shape."""
    x_a = noise(8, 35)
    x_b = 0.25 * x_a + 0.3 * lowpass(noise(8, 36), 2000.0)
    results = measure(FramedCodec(shape_in_codebook_1_level_in_codebook_2, decode_shape_at_level),
                      pair_batches(x_a, x_b))
    assert results["swap_gain"] > 0.8 and results["swap_gain_loudness_only"] > 0.8
    assert results["swap_gain_shape"] == pytest.approx(0.0, abs=1e-4)
    # The codec that moves everything to B (test above) scores 1 on the shape as well.
    low, high_a, high_b = lowpass(noise(8, 0)), noise(8, 1), noise(8, 2)
    x_a = low + (high_a - lowpass(high_a))
    x_b = low + 2.0 * ((0.6 * high_a + 0.8 * high_b) - lowpass(0.6 * high_a + 0.8 * high_b))
    moved = measure(FramedCodec(low_band_in_codebook_1), pair_batches(x_a, x_b))
    assert moved["swap_gain_shape"] == pytest.approx(1.0, abs=1e-3)


def test_ild_shape_fidelity_sees_only_the_difference_across_bands():
    """B = A 6 dB louder: a full ILD of -6 dB in every band and no shape at all, so the
    shape's error is 0 both ways; a codec that decodes both alike loses the full ILD."""
    x_a = noise(8, 37)
    results = measure(FramedCodec(everything_in_codebook_1), pair_batches(x_a, 2.0 * x_a))
    shape = results["ild_fidelity_shape"]
    assert shape["zero_error_db"] == pytest.approx(0.0, abs=1e-3)
    assert shape["error_db"] == pytest.approx(0.0, abs=1e-3)
    assert results["ild_fidelity"]["error_db"] == pytest.approx(0.0, abs=1e-3)


def test_swap_gain_uses_only_well_separated_capsules():
    low, high = lowpass(noise(8, 10)), noise(8, 11)
    x_a, x_b = low + (high - lowpass(high)), low + 3 * (high - lowpass(high))
    model = FramedCodec(low_band_in_codebook_1)
    close = measure(model, pair_batches(x_a, x_b, channels=CLOSE))
    assert (close["swap_n_pairs"] == 0 and close["swap_n_used"] == 0
            and math.isnan(close["swap_gain"]))
    assert "90 deg" in close["swap_pairs"]
    assert close["ild_fidelity"]["n_pairs"] == 8  # the cue fidelity still uses every pair
    anywhere, _ = evaluate_model(model, model.bins, pair_batches(x_a, x_b, channels=CLOSE),
                                 content_codebook=0, keep_examples=0, capsules=None)
    assert anywhere["swap_n_used"] == 8 and anywhere["swap_pairs"].startswith("all pairs")
    pairs = torch.tensor([SEPARATED, CLOSE, [0, 8], [0, 14],
                          [0, 18]])  # 138, 38, 79, 101, 180 degrees
    mask, _ = pair_cues.separated_pairs(pairs, eigenscape.CAPSULES)
    assert mask.tolist() == [True, False, False, True, True]
    caps = torch.as_tensor(eigenscape.CAPSULES)
    share = pair_cues.separated_pairs(torch.combinations(torch.arange(32)), caps)[0]
    share = share.double().mean()
    assert 0.35 < share < 0.65  # about half of the em32 pairs


# -- ILD / ITD fidelity at the pair's scale -------------------------------------------------

def level_different_pair(n: int, seed: int):
    """B: A coloured (low shelf down, high band up) and 6 dB quieter, plus its own noise,
    and 3 samples late: a level difference per band, broadband and spectral, and a delay."""
    x_a = noise(n, seed)
    coloured = lowpass(x_a, 2000.0) * 0.3 + (x_a - lowpass(x_a, 2000.0)) * 1.5
    x_b = 0.5 * torch.roll(coloured, 3, dims=-1) + 0.05 * noise(n, seed + 1)
    gains = torch.linspace(0.5, 2.0, n).reshape(n, 1, 1)  # a different ILD per pair
    return x_a * gains, x_b


def test_a_pass_through_codec_keeps_the_ild_and_itd_exactly():
    x_a, x_b = level_different_pair(8, 12)
    results = measure(FramedCodec(everything_in_codebook_1), pair_batches(x_a, x_b))
    ild, itd = results["ild_fidelity"], results["itd_fidelity"]
    assert ild["zero_error_db"] > 3.0  # the input pair differs
    assert ild["correlation"] == pytest.approx(1.0, abs=1e-6)
    assert (ild["error_db"] == pytest.approx(0.0, abs=1e-3)
            and ild["slope"] == pytest.approx(1.0, abs=1e-4))
    assert itd["zero_error_us"] > 100 and itd["error_us"] == pytest.approx(0.0, abs=1e-3)
    assert results["si_snr"] > 60 and results["mel_distance"] < 1e-3


def test_a_codec_that_decodes_both_channels_alike_scores_the_zero_prediction_error():
    """A decoder that ignores the codes: at one scale per pair both channels decode to the
    same audio, so its ILD error is exactly that of predicting no difference (a per-channel
    scale would restore the broadband level difference and look better)."""
    fixed = noise(1, 13)[0]

    def same_audio(latent):
        return fixed.expand(latent.shape[0], 1, LENGTH)

    x_a, x_b = level_different_pair(8, 14)
    results = measure(FramedCodec(everything_in_codebook_1, decoder=same_audio),
                      pair_batches(x_a, x_b))
    ild, itd = results["ild_fidelity"], results["itd_fidelity"]
    assert ild["mean_abs_ild_dec_db"] == pytest.approx(0.0, abs=1e-6) and ild["zero_error_db"] > 3.0
    assert ild["error_db"] == pytest.approx(ild["zero_error_db"], rel=1e-6)
    assert itd["error_us"] == pytest.approx(itd["zero_error_us"], rel=1e-6)
    # nothing to project on
    assert results["swap_n_used"] == 0 and results["swap_n_degenerate"] == 8


# -- agreement ceiling ----------------------------------------------------------------------

def test_ceiling_agreement_compares_each_channel_with_its_shifted_louder_copy_at_the_same_scale():
    model = FramedCodec(low_band_in_codebook_1)
    x_a, x_b = level_different_pair(6, 15)
    batches = pair_batches(x_a, x_b, batch=3)
    results = measure(model, batches)
    expected = []
    for wavs, _ in batches:
        x = wavs.flatten(0, 1)
        scale = EncodecModel.shared_scale(x, 2)
        same = model.encode(metrics.ceiling_copy(x), scale=scale) == model.encode(x, scale=scale)
        expected.append(same.double().mean(dim=2).reshape(-1, 2, 2).mean(dim=1))  # [B, n_q]
    expected = torch.cat(expected).mean(dim=0).tolist()
    assert results["ceiling_agreement"] == pytest.approx(expected)
    # A channel against itself would give 1; the copy at its own scale, where its 0.5 dB
    # are normalised away and the pair's level difference is not, something else.
    assert all(0.2 < c < 0.8 for c in results["ceiling_agreement"])
    copy = metrics.ceiling_copy(x_a)
    assert (torch.equal(copy[..., 1:], x_a[..., :-1] * 10 ** (0.5 / 20))
            and torch.all(copy[..., 0] == 0))


# -- probes ------------------------------------------------------------------------------

def probe_stream(n_files: int = 8, per_file: int = 10, seed: int = 16):
    """Pooled-embedding stand-ins (12 dimensions): codebook 2 of each channel holds the
    channel's band levels in a fixed random rotation (8 dimensions) and a direction per channel
    (4); codebook 1 is the file's content (the same for both channels) plus noise. Returns
    the accumulator inputs."""
    gen = torch.Generator().manual_seed(seed)
    n, dim = n_files * per_file, 12
    files = [f"f{i // per_file}" for i in range(n)]
    channels = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(n)])
    levels_a, levels_b = 3 * torch.randn(n, 8, generator=gen), 3 * torch.randn(n, 8, generator=gen)
    mix = torch.linalg.qr(torch.randn(8, 8, generator=gen))[0]  # a rotation: well conditioned
    directions = 3 * torch.randn(4, 4, generator=gen)
    content = torch.randn(n_files, dim, generator=gen).repeat_interleave(per_file, 0)
    cb1 = content[:, None].expand(n, 2, dim) + 0.1 * torch.randn(n, 2, dim, generator=gen)
    cb2 = torch.cat([torch.stack([levels_a @ mix, levels_b @ mix], 1), directions[channels]], dim=2)
    embeddings = [cb1[..., None].expand(n, 2, dim, 3), cb2[..., None].expand(n, 2, dim, 3)]
    cues = pair_cues.PairCues(levels={"in_a": levels_a, "in_b": levels_b, "rec_a": levels_a,
                                      "rec_b": levels_b, "swap": levels_a},
                              delays={"in": torch.zeros(n), "rec": torch.zeros(n)},
                              mel={k: torch.zeros(n) for k in ("swap_to_a", "swap_to_b",
                                                                "rec_a_to_b", "rec_b_to_b")})
    return files, channels, embeddings, cues


def probe_results(files, channels, embeddings, cues, settings=None) -> dict:
    n = len(files)
    acc = MetricAccumulator(n_q=2, bins=4, sample_rate=RATE, frame_rate=75, settings=settings)
    wavs = torch.zeros(n, 2, 1, 1100)
    acc.update(wavs, wavs, torch.zeros(n, 2, 2, 3, dtype=torch.long), embeddings, channels,
               groups=files, cues=cues)
    return acc.compute()


@pytest.mark.parametrize("settings", [InstrumentSettings(),
                                      InstrumentSettings(probe_shuffles=2, ild_probe_alpha=None,
                                                         channel_probe_c=None)],
                         ids=["per-epoch", "evaluate"])
def test_probes_find_the_ild_in_codebook_2_and_score_chance_on_shuffled_labels(settings):
    results = probe_results(*probe_stream(), settings=settings)
    assert (results["probe_folds"] == 5 and results["probe_groups"] == 8
            and results["probe_note"] is None)
    r2, shuffled = results["ild_probe_r2"], results["ild_probe_r2_shuffled"]
    assert r2[1] > 0.8 and r2[0] < 0.1            # the level difference is in codebook 2 only
    assert shuffled[1] < 0.1 and results["ild_probe_r2_std"][1] < 0.2
    accuracy, chance = results["channel_probe_accuracy"], results["channel_probe_chance"]
    assert accuracy[1] > 0.9 and abs(accuracy[0] - chance) < 0.2
    assert abs(results["channel_probe_accuracy_shuffled"][1] - 0.25) < 0.15  # 4 channels


def test_an_ild_probe_on_level_differences_of_rounding_size_is_undefined():
    """Channels that differ by float rounding only: there is no ILD to explain, and the probe
    says so (NaN, left out of the logs) instead of an R^2 of rounding noise."""
    files, channels, embeddings, cues = probe_stream()
    flat_b = cues.levels["in_a"] + 1e-5 * torch.randn(cues.levels["in_a"].shape,
                                                      generator=torch.Generator().manual_seed(4))
    cues.levels.update(in_b=flat_b)
    results = probe_results(files, channels, embeddings, cues)
    assert all(math.isnan(r2) for r2 in results["ild_probe_r2"])
    assert not any(name.startswith("ild_probe_r2") for name in flatten_metrics(results))


def test_probe_folds_are_grouped_by_file():
    """Codebook 1 identifies the file and the ILD target is the file's (the same for all its
    pairs): only a probe tested on files it was trained on could look good. With the files
    as groups it cannot; with each pair its own group it would."""
    files, channels, embeddings, cues = probe_stream()
    gen = torch.Generator().manual_seed(17)
    per_file = 3 * torch.randn(8, 8, generator=gen).repeat_interleave(10, 0)
    cues.levels["in_a"], cues.levels["in_b"] = per_file, torch.zeros_like(per_file)
    # The same for the channel index: each file recorded with its own pair of 8 capsules.
    file_index = torch.arange(len(files)) // 10
    channels = torch.stack([(2 * file_index) % 8, (2 * file_index + 1) % 8], dim=1)
    grouped = probe_results(files, channels, embeddings, cues)
    leaky = probe_results([str(i) for i in range(len(files))], channels, embeddings, cues)
    assert grouped["ild_probe_r2"][0] < 0.2
    assert leaky["ild_probe_r2"][0] > 0.6
    assert grouped["channel_probe_accuracy"][0] < 0.25
    assert leaky["channel_probe_accuracy"][0] > 0.4  # file -> its pair: half right


def test_probes_need_two_files():
    files, channels, embeddings, cues = probe_stream(n_files=2, per_file=5)
    results = probe_results(["one"] * len(files), channels, embeddings, cues)
    assert results["ild_probe_r2"] is None and results["channel_probe_accuracy"] is None
    assert "fewer than 2 files" in results["probe_note"]


# -- what the per-epoch validation logs ----------------------------------------------------

def test_flattened_results_carry_the_logged_names():
    x_a, x_b = level_different_pair(8, 18)
    results = measure(FramedCodec(low_band_in_codebook_1), pair_batches(x_a, x_b))
    flat = flatten_metrics(results)
    for name in ("swap_gain", "swap_gain_ci_low", "swap_gain_ci_high", "swap_separation_db",
                 "swap_mel_to_a", "swap_mel_to_b", "ild_corr", "ild_error_db",
                 "ild_zero_error_db", "ild_slope", "itd_error_us", "itd_zero_error_us", "si_snr",
                 "mel_distance", "si_snr_own_scale", "mel_distance_own_scale", "agreement_cb1",
                 "chance_agreement_cb2", "ceiling_agreement_cb1", "ceiling_agreement_cb2",
                 "ild_probe_r2_cb1", "ild_probe_r2_shuffled_cb2", "channel_probe_accuracy_cb2",
                 "channel_probe_chance", "perplexity_cb1", "dead_codes_cb2"):
        assert name in flat, name
    assert flat["ild_corr"] == pytest.approx(results["ild_fidelity"]["correlation"])
    assert flat["swap_gain_ci_low"] == results["swap_gain_ci"][0]


def test_measure_batch_decodes_every_view_of_a_pair_at_one_scale():
    """A real model: the reconstruction is the forward at the pair's common RMS, and the
    own-scale one at each channel's own RMS."""
    torch.manual_seed(1)
    model = EncodecModel(n_q=2, bins=16, dimension=16, filters=4, lstm=1, kmeans_iters=2)
    model.eval()
    x_a, x_b = level_different_pair(2, 19)
    wavs = torch.stack([x_a, x_b], dim=1)
    metas = [{"path": "f.wav", "channels": SEPARATED}] * 2
    measured, out = measure_batch(model, wavs, metas, content_codebook=0)
    x = wavs.flatten(0, 1)
    with torch.no_grad():
        common = model(x, scale=EncodecModel.shared_scale(x, 2)).audio
        own = model(x).audio
    torch.testing.assert_close(measured.audio.flatten(0, 1), common)
    torch.testing.assert_close(measured.audio_own_scale.flatten(0, 1), own)
    assert not torch.allclose(common, own)
    assert measured.cues is not None and measured.swap_audio.shape == (2, 1, LENGTH)
    acc = MetricAccumulator(2, 16, RATE, 75)
    accumulate(acc, measured)
    assert acc.compute()["ceiling_agreement"] is not None


def test_under_bf16_the_swap_is_decoded_in_the_precision_of_the_pair():
    """Two identical views: the swap of their codebooks is view 1's own decode, bit for bit,
    also under bf16 autocast (a swap decoded in float32 beside bf16 decodes of A and B would
    differ from A by the rounding alone, and move the swap gain)."""
    torch.manual_seed(2)
    model = EncodecModel(n_q=2, bins=16, dimension=16, filters=4, lstm=1, kmeans_iters=2).eval()
    x_a, _ = level_different_pair(2, 23)
    wavs = torch.stack([x_a, x_a], dim=1)
    metas = [{"path": "f.wav", "channels": SEPARATED}] * 2

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    measured, _ = measure_batch(model, wavs, metas, content_codebook=0, autocast=bf16)
    assert measured.swap_audio.dtype == torch.float32
    torch.testing.assert_close(measured.swap_audio, measured.audio[:, 0], rtol=0, atol=0)


def test_per_epoch_validation_logs_the_instrument(cfg_factory, synth_root, caplog):
    """The engine's validation pass on a tiny paired model logs every instrument figure as
    `val/...` and the decisive ones on the console."""
    from training.loaders import make_loader
    from training.parts import build_parts
    from training.runtime import setup_runtime
    from training.validation import VAL_SUMMARY, validate, validation_dataset

    cfg = cfg_factory("config_paired_nq2",
                      [f"datasets.data_root={synth_root}", "datasets.val_pairs=8",
                                            "model.kmeans_buffer=0"])
    runtime = setup_runtime(cfg)
    torch.manual_seed(0)
    parts = build_parts(cfg, runtime, steps_per_epoch=1)
    dataset = validation_dataset(cfg)
    with torch.no_grad():  # one training forward: the codebooks' k-means
        parts.raw_model.train()
        parts.raw_model(torch.cat([dataset[i][0] for i in range(len(dataset))]))
    logged = {}

    class Tracker:
        run = None

        def log(self, data, step):
            logged.update(data)

    with caplog.at_level("INFO", logger="encodec"):
        scalars = validate(parts, runtime, cfg,
                           make_loader(dataset, cfg, runtime.device, range(len(dataset))),
                           epoch=1, step=1, tracker=Tracker(), audio_dir=None)
    assert logged["epoch"] == 1 and all(logged[k] == v for k, v in scalars.items() if v == v)
    # An untrained codec barely separates the channels: its swap gain may be unmeasurable
    # (every pair degenerate) and is then left out; the separation that says so is there.
    assert "val/swap_separation_db" in scalars and "val/swap_input_separation_db" in scalars
    # It also decodes both channels alike (to float rounding): the ILD correlation is then
    # undefined and left out, and the slope says that no ILD is carried.
    assert scalars["val/ild_slope"] == 0.0 or "val/ild_corr" in scalars
    for name in ("ild_slope", "ild_error_db", "ild_zero_error_db", "itd_error_us", "si_snr",
                 "mel_distance_own_scale", "agreement_cb1", "chance_agreement_cb1",
                 "ceiling_agreement_cb1", "agreement_cb2", "chance_agreement_cb2",
                 "ceiling_agreement_cb2", "ild_probe_r2_cb1", "ild_probe_r2_shuffled_cb2",
                 "channel_probe_accuracy_cb1", "channel_probe_chance", "l_f_ch1"):
        assert f"val/{name}" in scalars, name
    summary = caplog.records[-1].getMessage()
    assert (summary.startswith("validation epoch 1:") and "swap_separation_db=" in summary
            and "ild_error_db=" in summary)
    assert all(name.startswith("val/") for name in VAL_SUMMARY)


def test_a_single_codebook_model_gets_cue_fidelity_but_no_swap():
    model = FramedCodec(lambda latent: [latent])
    model.n_q = 1
    x_a, x_b = level_different_pair(4, 20)
    results, _ = evaluate_model(model, model.bins, pair_batches(x_a, x_b), content_codebook=0,
                                keep_examples=1)
    assert results["swap_gain"] is None and results["swap_n_pairs"] is None
    assert results["ild_fidelity"]["error_db"] == pytest.approx(0.0, abs=1e-3)
    assert len(results["ceiling_agreement"]) == 1


def test_flattened_results_leave_out_what_could_not_be_measured():
    """Close capsules only: no swap gain; the logged scalars hold no NaN (resumed and
    distributed validations compare them for equality)."""
    low, high = lowpass(noise(4, 21)), noise(4, 22)
    results = measure(FramedCodec(low_band_in_codebook_1),
                      pair_batches(low + high, low - high, channels=CLOSE))
    assert math.isnan(results["swap_gain"])
    flat = flatten_metrics(results)
    assert "swap_gain" not in flat and "swap_gain_ci_low" not in flat and "ild_corr" in flat
    assert all(not math.isnan(v) for v in flat.values())
