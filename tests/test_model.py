"""EncodecModel: shapes and lengths, one forward contract in train and eval, per-codebook
embeddings with encoder gradients, one quantizer pass per forward, official-weights equivalence,
numerical safety, target bandwidths, variants, config building."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from model import EncodecModel, EncodecOutput

TINY = dict(filters=4, dimension=16, bins=32, lstm=1, kmeans_iters=2)


def make_tiny(**overrides) -> EncodecModel:
    torch.manual_seed(0)
    return EncodecModel(**{**TINY, **overrides})


def ready(model: EncodecModel, scale: float = 0.1) -> EncodecModel:
    """Initialised codebooks with counts above the dead-code threshold (no k-means needed)."""
    torch.manual_seed(1)
    for codebook in model.quantizer.codebooks:
        codebook.embed.normal_(std=scale)
        codebook.cluster_size.fill_(5.0)
        codebook.embed_avg.copy_(codebook.embed * 5.0)
        codebook.inited.fill_(1.0)
    return model


def encoder_grad_norm(model: EncodecModel) -> float:
    return sum(float(p.grad.norm()) for p in model.encoder.parameters() if p.grad is not None)


@pytest.fixture
def tiny_from_config(cfg_factory) -> EncodecModel:
    cfg = cfg_factory("config_mono_nq2")
    torch.manual_seed(0)
    return ready(EncodecModel.from_config(cfg.model))


@pytest.fixture(scope="module")
def official():
    """The official package's 24 kHz model with random weights and random initialised codebooks."""
    encodec = pytest.importorskip("encodec")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy weight_norm deprecation
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    for layer in model.quantizer.vq.layers:
        codebook = layer._codebook
        codebook.inited.fill_(1.0)
        codebook.embed.normal_()
        codebook.embed_avg.copy_(codebook.embed)
    model.set_target_bandwidth(1.5)  # 2 codebooks
    return model.eval()


def test_published_rates_and_shapes_in_train_and_eval(tiny_from_config):
    full = EncodecModel(target_bandwidths=[1.5])
    assert (full.sample_rate, full.frame_rate, full.hop_length, full.n_q) == (24000, 75, 320, 2)
    assert full.bandwidth == pytest.approx(1.5)
    assert full.quantizer.bins == 1024 and full.quantizer.dimension == 128
    latent = full.encoder(torch.zeros(1, 1, 24000))
    assert latent.shape == (1, 128, 75)

    model = tiny_from_config
    for training in (True, False):
        model.train(training)
        for length in (1920, 1921, 2239, 7):
            out = model(torch.randn(2, 1, length))
            assert isinstance(out, EncodecOutput)
            assert out.audio.shape == (2, 1, length)
            assert out.codes.shape == (2, 2, math.ceil(length / 320))
            assert out.codes.dtype == torch.long
            assert out.commit_loss.dim() == 0 and torch.isfinite(out.commit_loss)
            assert out.embeddings is None


def test_encode_decode_round_trip_equals_forward_in_eval(tiny_from_config):
    model = tiny_from_config.eval()
    assert model.audio_normalize
    x = torch.randn(2, 1, 1001) * 0.3
    with torch.no_grad():
        out = model(x)
        codes, scale = model.encode(x, return_scale=True)
        wav = model.decode(codes, scale=scale, length=x.shape[-1])
    assert torch.equal(codes, out.codes)
    assert torch.equal(model.encode(x), codes)
    assert scale.shape == (2, 1, 1)
    torch.testing.assert_close(wav, out.audio, atol=1e-6, rtol=1e-5)
    assert model.decode(codes).shape[-1] == codes.shape[-1] * 320


@pytest.mark.parametrize("training", [True, False])
def test_each_codebook_embedding_is_its_vectors_and_trains_the_encoder(tiny_from_config,
                                                                        training):
    model = tiny_from_config.train(training)
    embeds = [cb.embed.clone() for cb in model.quantizer.codebooks]  # before any EMA update
    x = torch.randn(2, 1, 1920)
    out = model(x, return_embeddings=True)
    assert len(out.embeddings) == model.n_q
    for k, embedding in enumerate(out.embeddings):
        assert embedding.shape == (2, 16, 6)
        expected = F.embedding(out.codes[:, k], embeds[k]).transpose(1, 2)
        torch.testing.assert_close(embedding, expected, atol=1e-6, rtol=1e-5)
    for k, embedding in enumerate(out.embeddings):
        model.zero_grad(set_to_none=True)
        embedding.pow(2).mean().backward(retain_graph=True)
        assert encoder_grad_norm(model) > 0, f"codebook {k} gives no gradient to the encoder"
        assert all(p.grad is None for p in model.decoder.parameters())


def test_decoded_codes_are_the_codes_of_the_embeddings_in_training(tiny_from_config):
    model = tiny_from_config.train()
    x = torch.randn(2, 1, 1920) * 0.5
    out = model(x, return_embeddings=True)
    _, scale = model.encode(x, return_scale=True)  # encode never updates the codebooks
    with torch.no_grad():
        from_embeddings = model.decoder(sum(out.embeddings))[..., :1920] * scale
    torch.testing.assert_close(out.audio.detach(), from_embeddings, atol=1e-5, rtol=1e-4)


def test_one_quantizer_pass_and_one_ema_update_per_training_forward(tiny_from_config):
    model = tiny_from_config.train()
    calls = [0] * model.n_q
    for k, codebook in enumerate(model.quantizer.codebooks):
        codebook.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    before = [cb.cluster_size.clone() for cb in model.quantizer.codebooks]
    out = model(torch.randn(2, 1, 1920), return_embeddings=True)
    assert calls == [1] * model.n_q
    for k, codebook in enumerate(model.quantizer.codebooks):
        counts = torch.bincount(out.codes[:, k].reshape(-1), minlength=32).float()
        torch.testing.assert_close(codebook.cluster_size, 0.99 * before[k] + 0.01 * counts)


def test_official_weights_give_the_same_codes_and_audio(official):
    ours = EncodecModel.from_official_state_dict(official.state_dict(), n_q=2).eval()
    assert not ours.audio_normalize and ours.encoder.model[0].causal
    torch.manual_seed(0)
    x = torch.randn(2, 1, 4007) * 0.1
    with torch.no_grad():
        frames = official.encode(x)
        codes = ours.encode(x)
        assert torch.equal(codes, frames[0][0])
        torch.testing.assert_close(ours.decode(codes), official.decode(frames), atol=1e-6,
                                   rtol=0)
        out = ours(x)
        assert torch.equal(out.codes, codes)
        torch.testing.assert_close(out.audio, official(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("amplitude", [0.0, 1e-7])
@pytest.mark.parametrize("training", [True, False])
def test_silence_and_very_quiet_input_stay_finite(amplitude, training):
    model = make_tiny(audio_normalize=True).train(training)
    if not training:
        ready(model)
    x = (amplitude * torch.randn(2, 1, 1920)).requires_grad_()
    out = model(x, return_embeddings=True)
    loss = out.audio.pow(2).mean() + out.commit_loss + sum(e.pow(2).mean() for e in out.embeddings)
    loss.backward()
    assert torch.isfinite(out.audio).all() and torch.isfinite(loss)
    assert out.audio.abs().max() <= 1e-4, "the input scale is restored"
    assert torch.isfinite(x.grad).all()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    for codebook in model.quantizer.codebooks:
        assert torch.isfinite(codebook.embed).all()


def test_target_bandwidths_select_the_codebooks_that_fit_as_in_encodec():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the design document's list with n_q=2 is not a mistake
        model = make_tiny(bins=1024, target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0])
    assert (model.target_bandwidths == [1.5, 3.0, 6.0, 12.0, 24.0]
            and model.bandwidth == pytest.approx(1.5))
    assert [model.codebooks_for_bandwidth(bw) for bw in model.target_bandwidths] == [2, 2, 2, 2, 2]
    # EnCodec 24 kHz: 32 codebooks of 1024 at 75 Hz, 0.75 kbps each.
    full = make_tiny(bins=1024, n_q=32, target_bandwidths=[24.0, 1.5, 3.0, 6.0, 12.0])
    assert full.target_bandwidths == [1.5, 3.0, 6.0, 12.0, 24.0]
    assert [full.codebooks_for_bandwidth(bw) for bw in full.target_bandwidths] == [2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="target_bandwidths"):
        model.codebooks_for_bandwidth(0.75)
    with pytest.raises(ValueError, match="positive"):
        make_tiny(target_bandwidths=[])


def future_sensitivity(model: EncodecModel) -> tuple[float, float]:
    """How much encoder frames 8-15 and decoder samples of frames 8-15 move when only input from
    frame 16 on moves.

    Measured before quantization, whose discrete codes could hide a change. The first frames
    are left out: reflect padding lets them see a few future samples even in EnCodec's causal
    model.
    """
    x = torch.randn(1, 1, 24 * 320)
    changed = x.clone()
    changed[..., 16 * 320:] += 1.0
    with torch.no_grad():
        z, z_changed = model.encoder(x), model.encoder(changed)
        z_future = z.clone()
        z_future[..., 16:] += 1.0
        y, y_changed = model.decoder(z), model.decoder(z_future)
    assert z.shape[-1] == 24 and y.shape[-1] == 24 * 320
    window = slice(8 * 320, 16 * 320)
    return (float((z[..., 8:16] - z_changed[..., 8:16]).abs().max()),
            float((y[..., window] - y_changed[..., window]).abs().max()))


@pytest.mark.parametrize("norm", ["weight_norm", "time_group_norm"])
def test_non_causal_variants_keep_lengths_and_see_the_future(norm):
    model = ready(make_tiny(causal=False, norm=norm)).eval()
    if norm == "time_group_norm":
        assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    for length in (2333, 1920, 5):
        with torch.no_grad():
            assert model(torch.randn(2, 1, length)).audio.shape == (2, 1, length)
    encoder_change, decoder_change = future_sensitivity(model)
    assert encoder_change > 1e-4 and decoder_change > 1e-4


def test_causal_model_does_not_see_the_future():
    encoder_change, decoder_change = future_sensitivity(make_tiny(causal=True).eval())
    assert encoder_change == 0.0 and decoder_change == 0.0


def test_time_group_norm_cannot_be_causal():
    with pytest.raises(ValueError, match="causal=False"):
        make_tiny(causal=True, norm="time_group_norm")
    with pytest.raises(ValueError, match="norm must be one of"):
        make_tiny(norm="batch_norm")


def test_bad_input_gets_an_actionable_error(tiny_from_config):
    with pytest.raises(ValueError, match="unsqueeze"):
        tiny_from_config(torch.randn(2, 1920))
    with pytest.raises(ValueError, match="channels=1"):
        tiny_from_config(torch.randn(2, 2, 1920))


def test_from_config_loads_official_weights_from_init_from(cfg_factory, official, tmp_path):
    path = tmp_path / "encodec_24khz.th"
    torch.save(official.state_dict(), path)
    cfg = cfg_factory("config_mono_nq2", [f"model.init_from={path}"], tiny=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = EncodecModel.from_config(cfg.model)
    official_conv = official.encoder.model[0].conv.conv
    torch.testing.assert_close(model.encoder.model[0].conv.conv.weight, official_conv.weight)
    official_embed = official.quantizer.vq.layers[1]._codebook.embed
    assert torch.equal(model.quantizer.codebooks[1].embed, official_embed)

    tiny = cfg_factory("config_mono_nq2", [f"model.init_from={path}"])
    with pytest.raises(ValueError, match="does not match"):
        EncodecModel.from_config(tiny.model)
    with pytest.raises(ValueError, match="holds only 32"):
        EncodecModel.from_official_state_dict(official.state_dict(), n_q=33)
    missing = cfg_factory("config_mono_nq2", [f"model.init_from={tmp_path / 'nope.th'}"])
    with pytest.raises(FileNotFoundError, match="nope.th"):
        EncodecModel.from_config(missing.model)


def test_from_config_rejects_unknown_keys(cfg_factory):
    cfg = cfg_factory("config_mono_nq2", ["+model.n_codebooks=4"])
    with pytest.raises(ValueError, match="n_codebooks"):
        EncodecModel.from_config(cfg.model)


def test_commitment_loss_per_item_sums_codebooks_and_averages_to_the_scalar(tiny_from_config):
    model = ready(tiny_from_config).eval()
    x = torch.randn(3, 1, 1920) * torch.tensor([0.01, 0.1, 1.0]).view(3, 1, 1)
    with torch.no_grad():
        out = model(x, return_embeddings=True)
        latent = model.encoder(model.normalize(x)[0])
    residual, expected = latent, torch.zeros(3)
    for emb in out.embeddings:  # the chosen vectors, codebook by codebook
        expected += (residual - emb).pow(2).mean(dim=(1, 2))
        residual = residual - emb
    torch.testing.assert_close(out.commit_per_item, expected)
    torch.testing.assert_close(out.commit_loss, out.commit_per_item.mean())


# ------------------------------------------------------------------ shared pair scale
def pair_6db_apart(items: int = 2, length: int = 1920) -> torch.Tensor:
    """`[items * 2, 1, T]` view-major pairs: view 1 is view 0 attenuated by 6 dB, items at
    different levels."""
    torch.manual_seed(3)
    loud = torch.randn(items, 1, 1, length) * torch.tensor([0.3, 0.02][:items]).view(-1, 1, 1, 1)
    pair = torch.cat([loud, loud * 10 ** (-6 / 20)], dim=1)  # [items, 2, 1, T]
    return pair.flatten(0, 1)


def level_difference_db(x: torch.Tensor) -> torch.Tensor:
    """Per item of view-major pairs, 20 log10 of the RMS ratio view 0 / view 1."""
    rms = x.pow(2).mean(dim=(1, 2)).sqrt().view(-1, 2)
    return 20 * torch.log10(rms[:, 0] / rms[:, 1])


def test_shared_scale_keeps_the_level_difference_of_a_pair():
    model = make_tiny()
    x = pair_6db_apart()
    scale = EncodecModel.shared_scale(x, views=2)
    assert scale.shape == (4, 1, 1)
    power = x.pow(2).mean(dim=(1, 2)).view(2, 2).mean(dim=1)
    torch.testing.assert_close(scale.flatten(), power.sqrt().repeat_interleave(2))

    shared, returned = model.normalize(x, scale)
    assert returned is scale
    torch.testing.assert_close(level_difference_db(shared), torch.full((2,), 6.0))
    own, _ = model.normalize(x)
    torch.testing.assert_close(level_difference_db(own), torch.zeros(2), atol=1e-4, rtol=0)
    # Each pair is at the common level 1: the items' overall levels are still removed.
    pair_power = shared.pow(2).mean(dim=(1, 2)).view(2, 2).mean(dim=1)
    torch.testing.assert_close(pair_power, torch.ones(2))
    assert torch.equal(EncodecModel.shared_scale(x, views=1), model.normalize(x)[1])


def test_a_given_scale_is_used_by_encode_forward_and_decode_restores_the_level(
        tiny_from_config):
    model = tiny_from_config.eval()
    x = pair_6db_apart()
    scale = EncodecModel.shared_scale(x, views=2)
    with torch.no_grad():
        out = model(x, scale=scale)
        codes, returned = model.encode(x, return_scale=True, scale=scale)
        assert returned is scale
        assert torch.equal(codes, out.codes)
        assert torch.equal(codes, model.quantizer.encode(model.encoder(x / scale)))
        torch.testing.assert_close(model.decode(codes, scale=scale, length=x.shape[-1]),
                                   out.audio)
        # The pair's common level is side information: the same pair 20 dB louder gives the
        # same codes and a decode 20 dB louder (the level difference lives in the codes).
        louder = model.encode(x * 10, scale=EncodecModel.shared_scale(x * 10, views=2))
        assert torch.equal(louder, codes)
        torch.testing.assert_close(
            model.decode(louder, scale=EncodecModel.shared_scale(x * 10, views=2)),
            10 * model.decode(codes, scale=scale))
        # Without a scale, each item's own RMS (default behaviour unchanged).
        _, own = model.normalize(x)
        torch.testing.assert_close(model(x).audio, model(x, scale=own).audio)


def test_a_scale_is_rejected_where_it_cannot_apply():
    x = pair_6db_apart()
    scale = EncodecModel.shared_scale(x, views=2)
    with pytest.raises(ValueError, match="audio_normalize=False"):
        make_tiny(audio_normalize=False).encode(x, scale=scale)
    with pytest.raises(ValueError, match=r"\[B, 1, 1\]"):
        make_tiny().encode(x, scale=scale[:2])
    with pytest.raises(ValueError, match="multiple of views"):
        EncodecModel.shared_scale(x[:3], views=2)


# ------------------------------------------------------------------ k-means status
def test_codebooks_initialise_in_order_after_enough_training_forwards():
    model = make_tiny(kmeans_buffer=1).train()  # 32 vectors per codebook, 24 per forward
    x = torch.randn(4, 1, 1920)
    model.eval()
    model(x)
    assert model.kmeans_progress == [0.0, 0.0], "eval forwards never gather"
    model.train()
    progress = []
    while not model.codebooks_initialized:
        model(x)
        progress.append(model.kmeans_progress)
        assert len(progress) < 10
    assert progress == [[0.75, 0.0], [1.0, 0.75], [1.0, 1.0]]


# The tiny architecture of make_tiny() as config overrides, for models built from a start.
TINY_MODEL = ["model.filters=4", "model.dimension=16", "model.bins=32", "model.lstm=1"]


def saved_start(tmp_path) -> tuple[EncodecModel, Path]:
    """A tiny model with initialised codebooks, saved as a start point (`model.init_from`)."""
    start = ready(make_tiny())
    path = tmp_path / "start.pt"
    torch.save({"model": start.state_dict(), "config": {}}, path)
    return start, path


def test_a_split_model_fine_tunes_an_unsplit_start_with_fresh_codebooks(cfg_factory, tmp_path):
    start, path = saved_start(tmp_path)
    cfg = cfg_factory("config_paired_nq2", [f"model.init_from={path}", *TINY_MODEL,
                                            "model.content_share=0.25"])
    model = EncodecModel.from_config(cfg.model)
    assert model.quantizer.content_dims == 4
    torch.testing.assert_close(model.encoder.model[0].conv.conv.weight,
                               start.encoder.model[0].conv.conv.weight)
    # The start's codes span every dimension: the split model runs its own k-means.
    assert not model.codebooks_initialized
    model.train()
    while not model.codebooks_initialized:
        model(0.1 * torch.randn(8, 1, 2400))
    first, second = model.quantizer.codebooks
    assert first.embed[:, 4:].abs().max() == 0 and second.embed[:, :4].abs().max() == 0
    with pytest.raises(ValueError, match="content_share"):
        make_tiny(content_share=1.0)


def test_a_one_codebook_model_fine_tunes_a_two_codebook_start(cfg_factory, tmp_path):
    start, path = saved_start(tmp_path)
    one = EncodecModel.from_config(cfg_factory("config_mono_nq2", [
        f"model.init_from={path}", "model.n_q=1", *TINY_MODEL]).model)
    assert one.n_q == 1 and one.codebooks_initialized
    torch.testing.assert_close(one.quantizer.codebooks[0].embed, start.quantizer.codebooks[0].embed)
    x = 0.1 * torch.randn(2, 1, 2400)
    torch.testing.assert_close(one.eval().decode(one.encode(x)),
                               start.eval().decode(start.encode(x)[:, :1]))


def test_a_three_codebook_model_fine_tunes_a_two_codebook_start(cfg_factory, tmp_path):
    start, path = saved_start(tmp_path)
    three = EncodecModel.from_config(cfg_factory("config_mono_nq2", [
        f"model.init_from={path}", "model.n_q=3", *TINY_MODEL]).model)
    first, second, third = three.quantizer.codebooks
    # The start point's codes are kept; the codebook it lacks is fitted by its own k-means
    # on what the first two leave, from the first training forwards.
    torch.testing.assert_close(first.embed, start.quantizer.codebooks[0].embed)
    torch.testing.assert_close(second.embed, start.quantizer.codebooks[1].embed)
    assert first.initialized and second.initialized and not third.initialized
    x = 0.1 * torch.randn(8, 1, 2400)
    torch.testing.assert_close(three.eval().decode(three.encode(x)[:, :2]),
                               start.eval().decode(start.encode(x)))
    three.train()
    while not third.initialized:
        three(x)
    latent = three.encoder(x)
    codes = three.quantizer.encode(latent)
    two_codebooks = (latent - three.quantizer.decode(codes[:, :2])).pow(2).mean()
    assert (latent - three.quantizer.decode(codes)).pow(2).mean() < 0.9 * two_codebooks
