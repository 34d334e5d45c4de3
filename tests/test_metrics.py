"""Metric functions on constructed cases whose right answer is known."""
from __future__ import annotations

import math

import pytest
import torch

from measure import metrics, pair_cues
from measure.accumulator import MetricAccumulator
from modules import spatial_cues


@pytest.fixture
def signals():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 2400, generator=gen)
    noise = torch.randn(3, 1, 2400, generator=gen)
    return x, noise


# -- reconstruction ---------------------------------------------------------------------

def test_identical_signals_score_perfectly(signals):
    x, _ = signals
    assert torch.all(metrics.si_snr(x, x.clone()) > 90)
    assert torch.allclose(metrics.mel_distance(x, x.clone()), torch.zeros(3))
    assert torch.allclose(metrics.stft_distance(x, x.clone()), torch.zeros(3))


def test_more_noise_scores_worse_per_item(signals):
    x, noise = signals
    light, heavy = x + 0.05 * noise, x + 0.5 * noise
    assert torch.all(metrics.si_snr(x, light) > metrics.si_snr(x, heavy))
    assert torch.all(metrics.mel_distance(x, light) < metrics.mel_distance(x, heavy))
    assert torch.all(metrics.stft_distance(x, light) < metrics.stft_distance(x, heavy))
    # SI-SNR of x + a * n against x is close to 10 log10(|x|^2 / |a n|^2) for white noise.
    expected = 10 * torch.log10(x.pow(2).sum(dim=(1, 2)) / (0.5 * noise).pow(2).sum(dim=(1, 2)))
    assert torch.allclose(metrics.si_snr(x, heavy), expected, atol=0.5)


def test_si_snr_ignores_gain_but_mel_distance_does_not(signals):
    x, _ = signals
    assert torch.all(metrics.si_snr(x, 3.0 * x) > 90)
    assert torch.all(metrics.mel_distance(x, 3.0 * x) > 0.3)  # log10(3) ~ 0.48 per bin


def test_bad_shapes_and_short_signals_are_rejected(signals):
    x, _ = signals
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.si_snr(x, x[..., :100])
    with pytest.raises(ValueError, match="too short"):
        metrics.mel_distance(x[..., :500], x[..., :500])


def test_nominal_bitrate_matches_encodec_1_5_kbps():
    assert metrics.nominal_bitrate_kbps(n_q=2, bins=1024, frame_rate=75) == pytest.approx(1.5)


# -- codebook health --------------------------------------------------------------------

def test_histogram_entropy_gives_perplexity_and_dead_codes():
    bins = 8
    constant = torch.zeros(4, 1, 10, dtype=torch.long)
    uniform = torch.arange(bins).repeat(4).reshape(4, 1, bins)
    half = torch.arange(bins // 2).repeat(4).reshape(4, 1, bins // 2)
    codes = torch.cat([constant[..., :4], uniform[..., :4]], dim=1)  # 2 codebooks
    entropy = lambda c: metrics.histogram_entropy(metrics.codebook_histogram(c, bins))  # noqa: E731
    assert entropy(constant).exp().tolist() == pytest.approx([1.0])
    assert entropy(uniform).exp().tolist() == pytest.approx([bins])
    assert entropy(half).tolist() == pytest.approx([math.log(bins // 2)])
    hist = metrics.codebook_histogram(codes, bins)
    assert hist.shape == (2, bins)
    assert hist[0].tolist() == [16] + [0] * 7
    assert hist[1].tolist() == [4, 4, 4, 4, 0, 0, 0, 0]
    results = accumulate_codes(torch.stack([half, half], dim=1), bins)  # the accumulator agrees
    assert (results["perplexity"] == pytest.approx([bins // 2])
            and results["dead_codes"] == [bins // 2])


def test_codes_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="out of range"):
        metrics.codebook_histogram(torch.full((1, 2, 3), 9), bins=8)
    with pytest.raises(ValueError, match="integer"):
        metrics.codebook_histogram(torch.zeros(1, 2, 3), bins=8)


# -- agreement and cosine ---------------------------------------------------------------

def accumulate_codes(codes: torch.Tensor, bins: int,
                     embeddings: list[torch.Tensor] | None = None) -> dict:
    """MetricAccumulator results for codes `[N, V, n_q, F]` (the audio is a stand-in)."""
    n, views, n_q, _ = codes.shape
    wavs = torch.randn(n, views, 1, 2400, generator=torch.Generator().manual_seed(0))
    acc = MetricAccumulator(n_q=n_q, bins=bins, sample_rate=24000, frame_rate=75)
    acc.update(wavs, wavs.clone(), codes, embeddings)
    return acc.compute()


def test_shared_codebook_agrees_and_channel_codebook_does_not():
    gen = torch.Generator().manual_seed(1)
    bins, n, frames = 64, 50, 20
    content = torch.randint(0, bins, (n, 1, frames), generator=gen)
    codes_a = torch.cat([content, torch.randint(0, bins, (n, 1, frames), generator=gen)], dim=1)
    codes_b = torch.cat([content, torch.randint(0, bins, (n, 1, frames), generator=gen)], dim=1)
    results = accumulate_codes(torch.stack([codes_a, codes_b], dim=1), bins)
    assert results["codebook_agreement"][0] == 1.0
    assert results["codebook_agreement"][1] < 0.05
    assert results["chance_agreement"] == pytest.approx([1 / bins, 1 / bins], abs=0.02)


def test_chance_needs_two_segments():
    codes = torch.zeros(1, 2, 2, 5, dtype=torch.long)
    results = accumulate_codes(codes, bins=4)
    assert results["codebook_agreement"] == [1.0, 1.0] and results["chance_agreement"] is None
    with pytest.raises(ValueError, match="at least 2 items"):
        metrics.centered_pooled_cosine(torch.zeros(1, 2, 2, 3))


def test_embedding_cosine_identical_opposite_and_chance():
    gen = torch.Generator().manual_seed(2)
    a = [torch.randn(6, 16, 5, generator=gen) for _ in range(2)]
    b = [a[0].clone(), -a[1]]
    embeddings = [torch.stack([ea, eb], dim=1) for ea, eb in zip(a, b)]  # [N, V, D, F]
    results = accumulate_codes(torch.zeros(6, 2, 2, 5, dtype=torch.long), 4, embeddings)
    assert results["embedding_cosine"] == pytest.approx([1.0, -1.0])
    assert all(abs(c) < 0.3 for c in results["chance_cosine"])


# -- swap and pair cues -------------------------------------------------------------------

def test_swap_sources_bookkeeping():
    assert pair_cues.swap_sources(2) == ("a", "b")
    assert pair_cues.swap_sources(3, content_codebook=1) == ("b", "a", "b")
    with pytest.raises(ValueError):
        pair_cues.swap_sources(1)
    with pytest.raises(ValueError):
        pair_cues.swap_sources(2, content_codebook=2)


def test_pair_cues_measure_the_swap_against_both_channels():
    """A swap that equals x_B is 0 from x_B and as far from x_A as B's decode is; the
    levels are those of the waveforms given, the delays those of the pairs."""
    gen = torch.Generator().manual_seed(3)
    x_a = torch.randn(2, 1, 4800, generator=gen)
    x_b = 0.5 * torch.roll(x_a, 2, dims=-1) + 0.05 * torch.randn(2, 1, 4800, generator=gen)
    cues = pair_cues.pair_cues(x_a, x_b, x_a, x_b, x_b.clone(), 24000)
    assert torch.allclose(cues.mel["swap_to_b"], torch.zeros(2), atol=1e-5)
    assert torch.allclose(cues.mel["swap_to_a"], cues.mel["rec_a_to_b"], atol=1e-5)
    assert torch.allclose(cues.mel["rec_b_to_b"], torch.zeros(2), atol=1e-5)
    assert cues.levels["in_a"].shape == (2, spatial_cues.CUE_BANDS)
    assert torch.allclose(cues.levels["in_a"] - cues.levels["in_b"],
                          torch.full((2, spatial_cues.CUE_BANDS), 6.0), atol=0.3)
    assert torch.allclose(cues.delays["in"] * 24000, torch.full((2,), 2.0, dtype=torch.float64),
                          atol=0.1)
    assert torch.equal(cues.delays["in"], cues.delays["rec"])
    assert pair_cues.pair_cues(x_a[..., :1000], x_b[..., :1000], x_a[..., :1000], x_b[..., :1000],
                               x_b[..., :1000], 24000) is None  # too short for the cues


def test_segment_band_levels_fit_short_segments_and_low_rates():
    x = torch.randn(1, 1, 1920)  # the tiny preset's segment: shorter than the default FFT
    assert pair_cues.cue_fft_size(1920, 2048) == 1024
    assert torch.isfinite(pair_cues.segment_band_levels(x, 24000)).all()
    low_rate_levels = pair_cues.segment_band_levels(torch.randn(1, 1, 16000), 16000)
    assert low_rate_levels.shape == (1, spatial_cues.CUE_BANDS)


# -- accumulator ------------------------------------------------------------------------

def _stream(n_items=7, views=2, n_q=2, bins=16, frames=6, dim=8, length=2400, seed=5):
    gen = torch.Generator().manual_seed(seed)
    wavs = torch.randn(n_items, views, 1, length, generator=gen)
    audio = wavs + 0.1 * torch.randn(wavs.shape, generator=gen)
    codes = torch.randint(0, bins, (n_items, views, n_q, frames), generator=gen)
    codes[:, 1:, 0] = codes[:, :1, 0]  # codebook 1 shared across the views
    embeddings = [torch.randn(n_items, views, dim, frames, generator=gen) for _ in range(n_q)]
    channels = torch.randint(0, 4, (n_items, views), generator=gen)
    return wavs, audio, codes, embeddings, channels


def _accumulate(stream, batch_size, flatten=False, n_q=2, bins=16):
    wavs, audio, codes, embeddings, channels = stream
    acc = MetricAccumulator(n_q=n_q, bins=bins, sample_rate=24000, frame_rate=75)
    files = [f"f{i % 3}" for i in range(wavs.shape[0])]
    for start in range(0, wavs.shape[0], batch_size):
        part = slice(start, start + batch_size)
        batch = [audio[part], codes[part], [e[part] for e in embeddings]]
        ceiling = codes[part].roll(1, dims=-1)
        if flatten:
            batch = [batch[0].flatten(0, 1), batch[1].flatten(0, 1),
                     [e.flatten(0, 1) for e in batch[2]]]
            ceiling = ceiling.flatten(0, 1)
        acc.update(wavs[part], *batch, channels=channels[part], groups=files[part],
                   ceiling_codes=ceiling)
    return acc.compute()


def test_accumulator_matches_direct_computations_and_ignores_batch_size():
    stream = _stream()
    wavs, audio, codes, embeddings, _ = stream
    whole = _accumulate(stream, batch_size=7)
    # item n meets item n + 1, the last the first
    following = lambda t: t.roll(-1, dims=0)  # noqa: E731
    agreement = lambda a, b: (a == b).float().mean(dim=(0, 2)).tolist()  # noqa: E731
    cosine = lambda a, b: [  # noqa: E731
        torch.nn.functional.cosine_similarity(x, y, dim=1).mean().item() for x, y in zip(a, b)]
    emb_a, emb_b = [e[:, 0] for e in embeddings], [e[:, 1] for e in embeddings]
    assert whole["num_items"] == 7
    assert whole["codebook_agreement"][0] == 1.0
    assert whole["codebook_agreement"] == pytest.approx(agreement(codes[:, 0], codes[:, 1]))
    assert whole["chance_agreement"] == pytest.approx(agreement(codes[:, 0],
                                                                following(codes[:, 1])))
    assert whole["embedding_cosine"] == pytest.approx(cosine(emb_a, emb_b), abs=1e-6)
    assert whole["chance_cosine"] == pytest.approx(cosine(emb_a, [following(e) for e in emb_b]),
                                                   abs=1e-6)
    pooled = torch.stack([e.mean(dim=-1) for e in embeddings], dim=2)
    same, chance = metrics.centered_pooled_cosine(pooled)
    assert whole["centered_cosine"] == pytest.approx(same.tolist(), abs=1e-6)
    assert whole["chance_centered_cosine"] == pytest.approx(chance.tolist(), abs=1e-6)
    assert whole["si_snr"] == pytest.approx(
        metrics.si_snr(wavs.flatten(0, 1), audio.flatten(0, 1)).mean().item(), rel=1e-5)
    hist = metrics.codebook_histogram(codes.flatten(0, 1), 16)
    assert whole["perplexity"] == pytest.approx(metrics.histogram_entropy(hist).exp().tolist())
    assert whole["dead_codes"] == (hist == 0).sum(dim=1).tolist()
    assert whole["ceiling_agreement"] == pytest.approx(
        agreement(codes.flatten(0, 1), codes.flatten(0, 1).roll(1, -1)))

    for batch_size, flatten in ((1, False), (3, True)):
        other = _accumulate(stream, batch_size, flatten)
        for key in ("codebook_agreement", "chance_agreement", "chance_cosine", "centered_cosine",
                    "perplexity",
                    "si_snr", "mel_distance", "ceiling_agreement", "channel_probe_accuracy"):
            assert other[key] == pytest.approx(whole[key], abs=1e-6), key


def test_accumulator_probe_finds_the_codebook_that_carries_the_channel():
    """Codebook 2's embedding is a direction per channel (plus noise), codebook 1's is noise;
    the items come from 8 files (the probe's folds)."""
    gen = torch.Generator().manual_seed(7)
    n_items, dim, frames, n_channels = 80, 8, 4, 4
    channels = torch.stack([torch.randperm(n_channels, generator=gen)[:2] for _ in range(n_items)])
    directions = 3 * torch.randn(n_channels, dim, generator=gen)
    channel_emb = (directions[channels][..., None]
                   + 0.3 * torch.randn(n_items, 2, dim, frames, generator=gen))
    noise_emb = torch.randn(n_items, 2, dim, frames, generator=gen)
    wavs = torch.randn(n_items, 2, 1, 2400, generator=gen)
    codes = torch.zeros(n_items, 2, 2, frames, dtype=torch.long)
    files = [f"f{i // 10}" for i in range(n_items)]
    acc = MetricAccumulator(n_q=2, bins=4, sample_rate=24000, frame_rate=75)
    for start in range(0, n_items, 16):
        part = slice(start, start + 16)
        acc.update(wavs[part], wavs[part], codes[part], [noise_emb[part], channel_emb[part]],
                   channels[part], groups=files[part])
    results = acc.compute()
    assert results["probe_groups"] == 8 and results["probe_folds"] == 5
    assert results["channel_probe_chance"] < 0.5
    assert results["channel_probe_accuracy"][1] > 0.9
    assert abs(results["channel_probe_accuracy"][0] - results["channel_probe_chance"]) < 0.2
    assert results["ild_probe_r2"] is None and "no pair cues" in results["probe_note"]


def test_accumulator_mono_has_no_pair_metrics_and_rejects_misuse():
    wavs, audio, codes, embeddings, channels = _stream(views=1)
    acc = MetricAccumulator(n_q=2, bins=16, sample_rate=24000, frame_rate=75)
    with pytest.raises(RuntimeError, match="before any update"):
        acc.compute()
    acc.update(wavs, audio, codes, embeddings)
    results = acc.compute()
    assert results["codebook_agreement"] is None and results["chance_agreement"] is None
    assert results["channel_probe_accuracy"] is None and results["ceiling_agreement"] is None
    assert results["swap_gain"] is None and results["ild_fidelity"] is None  # no pair cues given
    with pytest.raises(ValueError, match="views changed"):
        acc.update(*_stream(views=2)[:4])
    with pytest.raises(ValueError, match="codebooks"):
        MetricAccumulator(n_q=3, bins=16, sample_rate=24000,
                          frame_rate=75).update(wavs, audio, codes)


def test_accumulator_pools_pair_cues_over_batches_in_item_order():
    """The swap gain and cue fidelity of a stream are those of all its pairs at once,
    whatever the batches."""
    gen = torch.Generator().manual_seed(8)
    n = 6
    x_a = torch.randn(n, 1, 2400, generator=gen)
    x_b = 0.5 * x_a + 0.2 * torch.randn(n, 1, 2400, generator=gen)
    rec_a, rec_b = 0.9 * x_a, 0.8 * x_b + 0.01 * torch.randn(n, 1, 2400, generator=gen)
    swap = 0.5 * (rec_a + rec_b)
    wavs, audio = torch.stack([x_a, x_b], 1), torch.stack([rec_a, rec_b], 1)
    codes = torch.zeros(n, 2, 2, 5, dtype=torch.long)
    channels = torch.tensor([[0, 16]] * n)
    files = [f"f{i % 2}" for i in range(n)]
    results = []
    for batch in (n, 4):
        acc = MetricAccumulator(n_q=2, bins=4, sample_rate=24000, frame_rate=75)
        for s in range(0, n, batch):
            part = slice(s, s + batch)
            cues = pair_cues.pair_cues(x_a[part], x_b[part], rec_a[part], rec_b[part], swap[part],
                                       24000)
            acc.update(wavs[part], audio[part], codes[part], channels=channels[part],
                       groups=files[part], cues=cues)
        results.append(acc.compute())
    whole, batched = results
    level = lambda w: pair_cues.segment_band_levels(w, 24000)  # noqa: E731
    direct = spatial_cues.swap_gain_summary(level(swap), level(rec_a), level(rec_b), groups=files)
    assert whole["swap_gain"] == pytest.approx(direct["mean"]) and whole["swap_n_groups"] == 2
    assert whole["swap_gain_ci"] == pytest.approx([direct["ci_low"], direct["ci_high"]])
    assert whole["swap_pairs"].startswith("all pairs")  # no capsule geometry given
    for key in ("swap_gain", "swap_gain_ci", "swap_separation_db", "swap_mel_to_b"):
        assert batched[key] == pytest.approx(whole[key]), key
    for key in ("correlation", "error_db", "zero_error_db", "slope"):
        assert batched["ild_fidelity"][key] == pytest.approx(whole["ild_fidelity"][key]), key
    torch.testing.assert_close(torch.tensor(batched["per_pair"]["ild_true_db"]),
                               torch.tensor(whole["per_pair"]["ild_true_db"]))


def test_centering_reveals_what_a_common_offset_hides():
    """Every vector sits near a large shared offset: raw cosine is ~1 everywhere, but after
    centring the shared codebook correlates across channels and the independent one does not."""
    gen = torch.Generator().manual_seed(6)
    n, dim = 200, 16
    offset = 20 * torch.ones(dim)
    content = torch.randn(n, 1, dim, generator=gen)
    shared = offset + content.expand(n, 2, dim) + 0.1 * torch.randn(n, 2, dim, generator=gen)
    independent = offset + torch.randn(n, 2, dim, generator=gen)
    pooled = torch.stack([shared, independent], dim=2)  # [N, V, n_q, D]

    raw = torch.nn.functional.cosine_similarity(pooled[:, 0], pooled[:, 1], dim=-1).mean(dim=0)
    assert torch.all(raw > 0.9)
    same, chance = metrics.centered_pooled_cosine(pooled)
    assert same[0] > 0.95 and abs(same[1]) < 0.1
    assert torch.all(chance.abs() < 0.1)
