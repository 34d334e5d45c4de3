"""The paired terms inside one training step on a tiny model, each written out by hand:
cross-reconstruction at the pair's scale, cue fidelity, a shared content code, invariance,
code consensus, the design document's scale per channel, the switch-on and ramp, the heads,
and the gradient ratios that show each term's pull."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_config
from modules import channel_change, spatial_cues
from modules.pairwise_heads import level_difference_loss
from modules.pairwise_terms import code_consensus, info_nce, swap_latents
from modules.views import split_views
from pairwise_losses import PairwiseLoss, view_band_levels
from step_setup import (BATCH, CONTRASTIVE, SEED_RECIPE, VIEWS, init_codebooks, level_pair,
                        measured_step, per_view_of, tiny_setup)
from training.configuration import prepare_config
from training.step import train_step
from utils.checks import ConfigError


@pytest.mark.parametrize("shared", [True, False])
def test_contrastive_step_adds_cross_reconstruction_at_the_pairs_shared_scale(shared):
    cfg, runtime, parts = tiny_setup([*CONTRASTIVE, f"pairwise.shared_scale={shared}"])
    wavs, metas = level_pair(cfg)
    init_codebooks(parts, wavs)
    model, pairwise = copy.deepcopy(parts.raw_model), copy.deepcopy(parts.pairwise)

    result = train_step(parts, runtime, wavs, metas, step=3, adversarial=False, update_disc=False,
                        grad_clip=0.0, bins=cfg.model.bins)
    assert result.ok and {"l_sim", "l_div", "l_xrec", "xrec", "nce_accuracy"} <= set(result.scalars)

    # Written out: both channels normalised by the pair's common RMS (so the 6 dB stay in the
    # latent), and the swapped decodes scored against the other channel at that scale.
    # Without the shared scale, each channel keeps its own, and a swap is restored at its
    # target's.
    x = wavs.flatten(0, 1)
    scale = model.shared_scale(x, VIEWS) if shared else model.normalize(x)[1]
    assert torch.allclose(scale[0::2], scale[1::2]) == shared
    out = model.train()(x, return_embeddings=True, scale=scale)
    items = parts.generator_loss(x, out.audio)
    per_channel = lambda t: t.reshape(BATCH, VIEWS).mean(0)  # noqa: E731
    total = sum(cfg.losses[name] * per_channel(value).sum() for name, value in items.items())
    total = total + cfg.losses.commit * per_channel(out.commit_per_item).sum()
    views = split_views(out.embeddings, VIEWS)
    pair = pairwise.embedding_terms(views, 3, classes=["Beach"] * BATCH,
                                    channels=torch.tensor([m["channels"] for m in metas]))
    swap = swap_latents(views, content_codebook=0)
    decoded = model.decoder(swap.latents)[..., :x.shape[-1]] * scale[swap.target_index]
    xrec = parts.generator_loss.weighted_sum(parts.generator_loss(x[swap.target_index], decoded))
    total = total + pair["l_sim"] + pair["l_div"] + cfg.pairwise.xrec_weight * xrec.mean()
    model.zero_grad()
    total.backward()
    assert result.scalars["xrec"] == pytest.approx(xrec.mean().item(), rel=1e-5)
    assert result.scalars["loss_g"] == pytest.approx(total.item(), rel=1e-5)
    for (name, got), want in zip(parts.raw_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cue_fidelity_scores_the_decoded_pairs_level_differences():
    cfg, _, model, x, result = measured_step(["pairwise.cue_weight=0.5", "pairwise.xrec_weight=0"])
    out = model.train()(x, return_embeddings=True, scale=model.shared_scale(x, VIEWS))
    levels = lambda audio: (spatial_cues.band_levels(audio, 24000, n_fft=1024)  # noqa: E731
                            .view(BATCH, VIEWS, -1))
    decoded, inputs = levels(out.audio), levels(x)
    want = level_difference_loss(decoded[:, 0] - decoded[:, 1], inputs[:, 0] - inputs[:, 1],
                                 cfg.pairwise.ild_head.floor_db)
    assert result.scalars["cue"] == pytest.approx(want.item(), rel=1e-4)
    assert result.scalars["l_cue"] == pytest.approx(0.5 * want.item(), rel=1e-4)
    assert result.scalars["grad_ratio_cue"] > 0


def test_a_shared_content_code_gives_every_view_of_an_item_one_codebook_1_stream():
    cfg, parts, model, x, result = measured_step(["pairwise.shared_content_code=true"])
    assert result.ok
    scale = model.shared_scale(x, VIEWS)
    shared = model.train()(x, return_embeddings=True, scale=scale, content_views=VIEWS)
    own = copy.deepcopy(model)(x, scale=scale)
    codes = shared.codes.view(BATCH, VIEWS, *shared.codes.shape[1:])
    assert torch.equal(codes[:, 0, 0], codes[:, 1, 0])
    assert not torch.equal(own.codes[::VIEWS, 0], own.codes[1::VIEWS, 0])  # alone they differ
    with pytest.raises(ConfigError, match="model.content_share"):
        prepare_config(make_config("config_paired_nq2", [
            "datasets.data_root=unused", "pairwise.shared_content_code=true",
            "model.content_share=0"]))


def test_invariance_encodes_a_changed_first_view_at_its_scale_without_touching_the_codebooks(
        monkeypatch):
    changed, original = [], channel_change.random_channel_change

    def recorded_change(x, *args):
        changed.append(original(x, *args))
        return changed[-1]

    monkeypatch.setattr(channel_change, "random_channel_change", recorded_change)
    quantizers = {}
    for weight in ("0.5", "0"):
        _, parts, model, x, result = measured_step(["pairwise.xrec_weight=0",
                                                    f"pairwise.invariance.weight={weight}"])
        quantizers[weight] = parts.raw_model.quantizer.state_dict()
        if weight == "0":
            assert "l_inv" not in result.scalars and len(changed) == 1  # no extra encode
            continue
        # Written out: the changed copy of channel 1 at channel 1's scale (the pair's), coded
        # by the codebooks as they were, contrasted with channel 1's content codes.
        scale = model.shared_scale(x, VIEWS)
        out = model.train()(x, return_embeddings=True, scale=scale)
        first = split_views(out.embeddings, VIEWS)[0]
        copy_codes = model.quantizer.embeddings(model.encoder(changed[0] / scale[0::2]))
        want = info_nce(first[0], copy_codes[0]).loss.mean()
        assert result.scalars["inv"] == pytest.approx(want.item(), rel=1e-5)
        assert result.scalars["l_inv"] == pytest.approx(0.5 * want.item(), rel=1e-5)
        assert result.scalars["grad_ratio_inv"] > 0
    # The changed copy leaves no trace in the codebooks' statistics.
    for name, tensor in quantizers["0.5"].items():
        assert torch.equal(tensor, quantizers["0"][name]), name


@pytest.mark.parametrize("content_codebook", [0, 1])
def test_consensus_scores_what_the_content_codebook_quantized(content_codebook):
    _, _, model, x, result = measured_step(["pairwise.consensus_weight=2.0",
                                            "pairwise.xrec_weight=0",
                                            f"pairwise.content_codebook={content_codebook}",
                                            f"pairwise.channel_codebook={1 - content_codebook}"])
    # Written out: codebook k quantizes the encoder output minus the earlier codebooks'
    # vectors, at the pair's scale; the codes are those of the codebook after its update.
    out = model.train()(x, return_embeddings=True, scale=model.shared_scale(x, VIEWS))
    # (The paired config's split quantizer: codebook k codes only its own dimensions.)
    codebook = model.quantizer.codebooks[content_codebook]
    assert model.quantizer.content_dims > 0
    quantized = out.latent - sum(e for e in out.embeddings[:content_codebook])
    quantized = quantized * codebook.dims[:, None]
    a, b = (view[0] for view in split_views([quantized], VIEWS))
    want = code_consensus(a, b, codebook.embed * codebook.dims)
    assert result.scalars["consensus"] == pytest.approx(want.loss.mean().item(), rel=1e-5)
    assert result.scalars["l_consensus"] == pytest.approx(2 * want.loss.mean().item(), rel=1e-5)
    assert result.scalars["consensus_agreement"] == pytest.approx(want.agreement.item())
    assert result.scalars["consensus"] > 0 and result.scalars["grad_ratio_consensus"] > 0


def test_consensus_under_a_shared_content_code_scores_each_views_own_content():
    _, _, model, x, result = measured_step(["pairwise.consensus_weight=1.0",
                                            "pairwise.shared_content_code=true",
                                            "pairwise.xrec_weight=0"])
    # Written out: each view's own encoder output (not the views' mean, which the step
    # decoded and on which both views trivially agree), content dimensions only.
    # The codes are those of the codebook after the step's update, which this forward repeats.
    scale = model.shared_scale(x, VIEWS)
    out = model.train()(x, scale=scale, content_views=VIEWS)
    codebook = model.quantizer.codebooks[0]
    own = model.encoder(x / scale)
    assert torch.allclose(out.latent, own)
    own = own * codebook.dims[:, None]
    a, b = (view[0] for view in split_views([own], VIEWS))
    want = code_consensus(a, b, codebook.embed * codebook.dims)
    assert result.scalars["consensus"] == pytest.approx(want.loss.mean().item(), rel=1e-4)
    assert result.scalars["consensus_agreement"] == pytest.approx(want.agreement.item())
    assert result.scalars["consensus"] > 0 and result.scalars["grad_ratio_consensus"] > 0


def test_the_reversed_level_twin_under_a_shared_content_code_reads_each_views_own_content():
    cfg, runtime, parts = tiny_setup([*CONTRASTIVE, "pairwise.shared_content_code=true",
                                      "pairwise.xrec_weight=0", "pairwise.ild_head.enabled=true"])
    wavs, metas = level_pair(cfg)
    init_codebooks(parts, wavs)
    model, pairwise = copy.deepcopy(parts.raw_model), copy.deepcopy(parts.pairwise)
    result = train_step(parts, runtime, wavs, metas, step=3, adversarial=False, update_disc=False,
                        grad_clip=0.0, bins=cfg.model.bins, measure_gradients=True)
    # Written out: the twin reads each view's own encoder output on the content dimensions
    # (the shared code the step decoded is one code for both views: from it the antisymmetric
    # twin predicts exactly no difference, and its reversed gradient is 0).
    x = wavs.flatten(0, 1)
    scale = model.shared_scale(x, VIEWS)
    own = model.encoder(x / scale) * model.quantizer.codebooks[0].dims[:, None]
    a, b = (view[0] for view in split_views([own], VIEWS))
    levels = view_band_levels(x, 24000, VIEWS, cfg.pairwise.ild_head.n_bands)
    targets = levels[:, 0] - levels[:, 1]
    want = level_difference_loss(pairwise.ild_twin(a, b), targets, cfg.pairwise.ild_head.floor_db)
    assert result.scalars["ild_adv"] == pytest.approx(want.item(), rel=1e-4)
    assert result.scalars["grad_ratio_ild_adv"] > 0


def test_the_design_documents_recipe_keeps_a_scale_per_channel():
    cfg, runtime, parts = tiny_setup(SEED_RECIPE)
    wavs, metas = level_pair(cfg)
    init_codebooks(parts, wavs)
    model = copy.deepcopy(parts.raw_model)
    result = train_step(parts, runtime, wavs, metas, step=3, adversarial=False, update_disc=False,
                        grad_clip=0.0, bins=cfg.model.bins)
    out = model.train()(wavs.flatten(0, 1))  # each channel divided by its own RMS
    l_f = per_view_of(parts.generator_loss(wavs.flatten(0, 1), out.audio)["l_f"])
    assert result.scalars["l_f_ch2"] == pytest.approx(l_f[1].item(), rel=1e-5)
    assert "l_xrec" not in result.scalars


def test_pairwise_terms_wait_for_their_start_step_and_for_kmeans():
    def scalars(overrides, step, forwards=1):
        cfg, runtime, parts = tiny_setup([*CONTRASTIVE, *overrides])
        wavs, metas = level_pair(cfg)
        for _ in range(forwards):
            init_codebooks(parts, wavs)
        return train_step(parts, runtime, wavs, metas, step=step, adversarial=False,
                          update_disc=False, grad_clip=0.0, bins=cfg.model.bins).scalars

    assert "l_sim" not in scalars(["pairwise.start_step=5"], step=4)
    assert "l_sim" in scalars(["pairwise.start_step=5"], step=5)
    waiting = scalars(["model.kmeans_buffer=10"], step=50)  # 24 of 320 vectors gathered
    assert waiting["kmeans_done"] == 0 and "l_sim" not in waiting and "l_xrec" not in waiting
    assert "l_sim" in scalars(["model.kmeans_buffer=10", "pairwise.wait_for_kmeans=false"], step=50)


def test_the_ramp_starts_when_the_gate_opens_and_survives_a_resume():
    # start_step 5, but k-means (32 vectors, 24 a step) is done only in the step at 60: the
    # ramp starts there, not at start_step (which would give the full weight at once).
    cfg, runtime, parts = tiny_setup([*CONTRASTIVE, "model.kmeans_buffer=1",
                                      "pairwise.start_step=5", "pairwise.schedule=linear",
                                      "pairwise.ramp_steps=10"])
    wavs, metas = level_pair(cfg)

    def step(at: int) -> dict:
        return train_step(parts, runtime, wavs, metas, step=at, adversarial=False,
                          update_disc=False, grad_clip=0.0, bins=cfg.model.bins).scalars

    assert "l_sim" not in step(50) and int(parts.pairwise.switched_on_at) == -1
    assert "l_sim" not in step(60)  # the gate opens here: weight 0 on its first step
    assert int(parts.pairwise.switched_on_at) == 60
    half = step(65)
    assert half["l_sim"] == pytest.approx(0.5 * cfg.pairwise.sim_weight * half["sim"], rel=1e-5)
    resumed = PairwiseLoss.from_config(cfg.pairwise, cfg.model.dimension)
    resumed.load_state_dict(parts.pairwise.state_dict())
    assert resumed.schedule_factor(65) == 0.5 and resumed.schedule_factor(70) == 1.0
    # A checkpoint written before the switch-on step was kept ramps from start_step.
    older = {k: v for k, v in parts.pairwise.state_dict().items() if k != "switched_on_at"}
    resumed.load_state_dict(older)
    assert int(resumed.switched_on_at) == 5 and resumed.schedule_factor(10) == 0.5


def test_both_heads_on_train_the_classifier_before_the_scheduled_terms_start():
    # The classifier is unscheduled and runs from the first step; the level-difference head
    # waits with the other scheduled terms (its targets are not measured before).
    cfg, runtime, parts = tiny_setup([*CONTRASTIVE, "pairwise.start_step=5",
                                      "pairwise.channel_classifier.enabled=true",
                                      "pairwise.ild_head.enabled=true"])
    wavs, metas = level_pair(cfg)
    init_codebooks(parts, wavs)
    for step, scheduled_on in ((0, False), (4, False), (5, True)):
        result = train_step(parts, runtime, wavs, metas, step=step, adversarial=False,
                            update_disc=False, grad_clip=0.0, bins=cfg.model.bins)
        assert result.ok and result.scalars["l_cls"] > 0, step
        assert ("l_ild" in result.scalars) == ("l_xrec" in result.scalars) == scheduled_on, step


def test_gradient_ratios_are_each_terms_pull_on_the_latent_next_to_the_reconstructions():
    def ratios(overrides):
        cfg, runtime, parts = tiny_setup([*CONTRASTIVE, *overrides])
        wavs, metas = level_pair(cfg)
        init_codebooks(parts, wavs)
        return train_step(parts, runtime, wavs, metas, step=3, adversarial=False,
                          update_disc=False, grad_clip=0.0, bins=cfg.model.bins,
                          measure_gradients=True).scalars

    base = ratios([])
    assert {"grad_ratio_sim", "grad_ratio_div", "grad_ratio_xrec"} <= set(base)
    assert base["grad_ratio_sim"] > 0 and base["grad_ratio_xrec"] > 0
    doubled = ratios(["pairwise.sim_weight=2.0"])  # the same step with twice the weight
    assert doubled["grad_ratio_sim"] == pytest.approx(2 * base["grad_ratio_sim"], rel=1e-4)
    assert doubled["grad_ratio_xrec"] == pytest.approx(base["grad_ratio_xrec"], rel=1e-4)
    heavier_reconstruction = ratios(["losses.l_f=2.0", "losses.l_t=0.2"])
    assert heavier_reconstruction["grad_ratio_sim"] == pytest.approx(base["grad_ratio_sim"] / 2,
                                                                     rel=1e-4)
