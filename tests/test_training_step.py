"""One training step on a tiny model: its losses and gradients against the design document's
sum written out by hand, the discriminator's paths, skipped steps, the learning-rate
schedule, and the parts that must be identical on every rank (the paired terms inside the
step: test_pairwise_step.py)."""
from __future__ import annotations

import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training import engine
from conftest import make_config
from reference_step import reference_step
from training.configuration import prepare_config
from modules.losses import discriminator_loss, feature_matching_loss, generator_adv_loss
from modules.views import split_views
from training.parts import WarmupCosine, build_parts, set_learning_rates
from training.runtime import Runtime, seed_everything
from step_faults import fp16_scalers, nan_time_loss, overflowing_gradient
from training.step import discriminate, frozen, normalisation_scale, train_step
from step_setup import (BATCH, CONTRASTIVE, SEED_RECIPE, VIEWS, init_codebooks, level_pair,
                        make_batch, tiny_setup)

# ----------------------------------------------------------------------------------------
# The step


def test_train_step_applies_the_design_documents_loss_and_its_gradients(float64):
    cfg, runtime, parts = tiny_setup(SEED_RECIPE)
    wavs, metas = make_batch(cfg)
    init_codebooks(parts, wavs)
    model, disc, pairwise = (copy.deepcopy(m)
                             for m in (parts.raw_model, parts.raw_disc, parts.pairwise))

    result = train_step(parts, runtime, wavs, metas, step=3, adversarial=True, update_disc=True,
                        grad_clip=0.0, bins=cfg.model.bins)
    assert result.ok

    # The same step written out: sum over channels of the weighted losses + commitment,
    # plus the pairwise losses; the discriminator's hinge loss on real and detached fake.
    x = wavs.flatten(0, 1)
    out = model.train()(x, return_embeddings=True)
    fake_logits, fake_fmaps = disc(out.audio)
    real_fmaps = [[f.detach() for f in scale] for scale in disc(x)[1]]
    items = parts.generator_loss(x, out.audio, fake_logits, real_fmaps, fake_fmaps)
    per_channel = lambda t: t.reshape(BATCH, VIEWS).mean(0)  # noqa: E731
    weights = cfg.losses
    total = sum(weights[name] * per_channel(value).sum() for name, value in items.items())
    total = total + weights.commit * per_channel(out.commit_per_item).sum()
    pair = pairwise.embedding_terms(split_views(out.embeddings, VIEWS), 3,
                                    classes=["Beach"] * BATCH,
                                    channels=torch.tensor([m["channels"] for m in metas]))
    total = total + pair["l_sim"] + pair["l_div"]
    model.zero_grad()
    total.backward()
    # (The logged scalars are float32.)
    assert result.scalars["loss_g"] == pytest.approx(total.item(), rel=1e-6)
    assert result.scalars["l_f_ch2"] == pytest.approx(per_channel(items["l_f"])[1].item(), rel=1e-6)
    for (name, got), want in zip(parts.raw_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12, msg=name)

    disc.zero_grad()
    logits = disc(torch.cat([x, out.audio.detach()]))[0]
    loss_d = per_channel(discriminator_loss([l[:BATCH * VIEWS] for l in logits],
                                            [l[BATCH * VIEWS:] for l in logits])).sum()
    loss_d.backward()
    assert result.scalars["loss_d"] == pytest.approx(loss_d.item(), rel=1e-6)
    for got, want in zip(parts.raw_disc.parameters(), disc.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)

    # The update used the learning rate of step 3, and moved the weights.
    assert result.scalars["lr_g"] == pytest.approx(cfg.optimization.lr * parts.schedule(3))
    assert any(not torch.equal(a, b)
               for a, b in zip(parts.raw_model.parameters(), model.parameters()))


# Mono and paired, the balancer off and on, the default recipe and the previous one (its parts
# on and off); all with the configured gain jitter (the same draws in both steps).
REFERENCE_CASES = [
    pytest.param(1, [], id="mono"),
    pytest.param(2, [], id="paired"),
    pytest.param(1, ["balancer.enabled=true"], id="mono-balancer"),
    pytest.param(2, ["balancer.enabled=true"], id="paired-balancer"),
    # The default recipe (a shared content code, code consensus, the level twin on each view's
    # own content) with the cue term on.
    pytest.param(2, ["pairwise=contrastive", "pairwise.start_step=0", "pairwise.schedule=constant",
                     "pairwise.cue_weight=0.5"], id="paired-contrastive"),
    pytest.param(2, ["pairwise=contrastive", "pairwise.start_step=0", "pairwise.schedule=constant",
                     "pairwise.consensus_weight=0", "pairwise.ild_head.enabled=false"],
                 id="paired-shared-content-code"),
    pytest.param(2, ["pairwise=contrastive", "pairwise.start_step=0", "pairwise.schedule=constant",
                     "pairwise.ild_head.reversal=0.5"], id="paired-level-twin-reversal"),
    # The level twin on codebook 1 (each view's own code).
    pytest.param(2, ["pairwise=contrastive", "pairwise.start_step=0", "pairwise.schedule=constant",
                     "pairwise.shared_content_code=false", "pairwise.consensus_weight=0"],
                 id="paired-level-twin-own-codes"),
    # The previous default: each view's own codebook 1, cross-reconstruction.
    pytest.param(2, ["pairwise=contrastive", "pairwise.start_step=0", "pairwise.schedule=constant",
                     "pairwise.shared_content_code=false", "pairwise.consensus_weight=0",
                     "pairwise.xrec_weight=1.0", "pairwise.cue_weight=0.5",
                     "pairwise.ild_head.enabled=false"], id="paired-xrec"),
    pytest.param(2, ["pairwise=contrastive", "pairwise.start_step=0", "pairwise.schedule=constant",
                     "pairwise.shared_content_code=false", "pairwise.xrec_weight=1.0",
                     "pairwise.cue_weight=0.5", "pairwise.cue_shape=true"], id="paired-cue-shape"),
]
# (adversarial, update_disc) of four steps in a row: before the discriminator starts, then
# steps with and without its update.
STEP_KINDS = [(False, False), (True, True), (True, False), (True, True)]


@pytest.mark.parametrize("views, overrides", REFERENCE_CASES)
def test_train_step_computes_what_the_straightforward_step_computes(views, overrides, float64):
    cfg, runtime, parts = tiny_setup([f"datasets.views={views}", "model.kmeans_buffer=0",
                                      *overrides])
    init_codebooks(parts, make_batch(cfg, seed=99, views=views)[0])
    reference = copy.deepcopy(parts)
    for step, (adversarial, update_disc) in enumerate(STEP_KINDS):
        wavs, metas = make_batch(cfg, seed=step, views=views)
        torch.manual_seed(step)  # dead-code draws, the same in both
        got = train_step(parts, runtime, wavs, metas, step=step, adversarial=adversarial,
                         update_disc=update_disc, grad_clip=0.0, bins=cfg.model.bins,
                         gain_jitter_db=cfg.datasets.gain_jitter_db)
        torch.manual_seed(step)
        want = reference_step(reference, runtime, wavs, metas, step=step, adversarial=adversarial,
                              update_disc=update_disc, gain_jitter_db=cfg.datasets.gain_jitter_db,
                              pairwise_cfg=cfg.pairwise if views > 1 else None)
        assert got.ok and want.pop("ok")
        assert {"l_g_ch1", "l_feat_ch1"} <= set(want) or not adversarial
        assert ("loss_d" in want) == update_disc
        for name, value in want.items():
            # (The logged scalars are float32.)
            assert (got.scalars[name] == pytest.approx(value, rel=1e-6,
                                                       abs=1e-12)), f"step {step}: {name}"
        for part in ("raw_model", "raw_disc", "pairwise"):
            if getattr(parts, part) is None:  # mono: no pairwise losses
                continue
            for (name, mine), theirs in zip(getattr(parts, part).named_parameters(),
                                            getattr(reference, part).parameters()):
                where = f"step {step}: {part}.{name}"
                if theirs.grad is None or mine.grad is None:
                    assert mine.grad is None and theirs.grad is None, where
                else:
                    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12,
                                               msg=where)
                # Adam divides by sqrt(v) + 1e-8: a gradient that is 0 up to rounding (1e-17)
                # moves a weight by ~lr * 1e-9 in one and not in the other.
                torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10, msg=where)
        for (name, mine), theirs in zip(parts.raw_model.named_buffers(),
                                        reference.raw_model.buffers()):
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12,
                                       msg=f"step {step}: {name}")


def test_non_finite_step_changes_nothing_and_restores_the_codebooks():
    cfg, runtime, parts = tiny_setup()
    wavs, metas = make_batch(cfg)
    init_codebooks(parts, wavs)
    codebooks = {name: b.clone() for name, b in parts.raw_model.named_buffers()}
    weights = [p.clone() for p in parts.raw_model.parameters()]
    with nan_time_loss():
        result = train_step(parts, runtime, wavs, metas, step=0, adversarial=True, update_disc=True,
                            grad_clip=0.0, bins=cfg.model.bins)
    assert not result.ok
    for name, buffer in parts.raw_model.named_buffers():
        assert torch.equal(buffer, codebooks[name]), f"{name} kept the skipped step's update"
    assert all(torch.equal(p, w) for p, w in zip(parts.raw_model.parameters(), weights))
    assert all(p.grad is None for p in parts.raw_model.parameters())

    # A finite step does update the codebooks.
    assert train_step(parts, runtime, wavs, metas, step=0, adversarial=True, update_disc=True,
                      grad_clip=0.0, bins=cfg.model.bins).ok
    assert any(not torch.equal(b, codebooks[name]) for name, b in parts.raw_model.named_buffers())


def test_fp16_a_skipped_step_closes_the_gradscalers_and_training_goes_on():
    cfg, runtime, parts = tiny_setup()
    fp16_scalers(parts)
    wavs, metas = make_batch(cfg)
    with nan_time_loss():
        skipped = train_step(parts, runtime, wavs, metas, step=0, adversarial=True,
                             update_disc=True, grad_clip=0.0, bins=cfg.model.bins)
    assert not skipped.ok and skipped.reason == "non-finite loss"
    # The NaN reached the generator's gradients: its scaler lowered the scale, as for an
    # overflow; the discriminator's gradients were finite, so its scale stays.
    assert parts.scaler_g.get_scale() == 2.0 ** 15 and parts.scaler_d.get_scale() == 2.0 ** 16
    # Before, the next unscale_() raised: "unscale_() has already been called on this
    # optimizer since the last update()".
    for update_disc in (True, False):
        assert train_step(parts, runtime, wavs, metas, step=0, adversarial=True,
                          update_disc=update_disc, grad_clip=0.0, bins=cfg.model.bins).ok


@pytest.mark.parametrize("player, reason", [
    ("raw_model", "gradient overflow at fp16 loss scale 65536"),
    ("raw_disc", "discriminator gradient overflow at fp16 loss scale 65536"),
])
def test_fp16_an_overflowed_step_leaves_no_trace_and_is_reported_as_skipped(player, reason):
    cfg, runtime, parts = tiny_setup()
    fp16_scalers(parts)
    wavs, metas = make_batch(cfg)
    init_codebooks(parts, wavs)
    codebooks = {name: b.clone() for name, b in parts.raw_model.named_buffers()}
    weights = [p.clone() for p in [*parts.raw_model.parameters(), *parts.raw_disc.parameters()]]
    # A finite loss whose scaled gradient overflows (inf in one weight's gradient, of either
    # player): the GradScaler alone would skip that player's optimizer step but let the other
    # player step and the codebooks' EMA and the step count advance.
    with overflowing_gradient(getattr(parts, player)):
        result = train_step(parts, runtime, wavs, metas, step=0, adversarial=True,
                            update_disc=True, grad_clip=0.0, bins=cfg.model.bins)
    assert math.isfinite(result.scalars["loss_g"]) and math.isfinite(result.scalars["loss_d"])
    assert not result.ok and result.reason == reason
    for name, buffer in parts.raw_model.named_buffers():
        assert torch.equal(buffer, codebooks[name]), f"{name} kept the skipped step's update"
    params = [*parts.raw_model.parameters(), *parts.raw_disc.parameters()]
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert not parts.opt_g.state and not parts.opt_d.state  # Adam never stepped
    overflowed, other = ((parts.scaler_g, parts.scaler_d) if player == "raw_model"
                         else (parts.scaler_d, parts.scaler_g))
    assert overflowed.get_scale() == 2.0 ** 15 and other.get_scale() == 2.0 ** 16
    # The other player took no step at its scale: the skip does not count toward its growth.
    assert other.state_dict()["_growth_tracker"] == 0
    result = train_step(parts, runtime, wavs, metas, step=0, adversarial=True, update_disc=True,
                        grad_clip=0.0, bins=cfg.model.bins)
    assert result.ok and not result.reason and parts.opt_g.state and parts.opt_d.state


# ----------------------------------------------------------------------------------------
# The discriminator's paths


def test_each_players_gradient_goes_to_its_own_parameters(float64):
    cfg, runtime, parts = tiny_setup()
    wavs, _ = make_batch(cfg)
    x = wavs.flatten(0, 1)
    y = (x + 0.01 * torch.randn_like(x)).requires_grad_()  # the generator's output
    disc = copy.deepcopy(parts.raw_disc)

    # Without an update: the generator's terms reach the audio only, as the gradient of the
    # plain weighted sum (through the discriminator, whose weights get nothing).
    adversarial = discriminate(parts, runtime, x, y, BATCH, VIEWS, update_disc=False)
    assert adversarial.loss_d is None and y.grad is None
    assert all(p.grad is None for p in parts.raw_disc.parameters())
    fake_logits, fake_fmaps = disc(y)
    real_fmaps = disc(x)[1]
    per_item = {"l_g": generator_adv_loss(fake_logits),
                "l_feat": feature_matching_loss(real_fmaps, fake_fmaps)}
    for name, values in per_item.items():
        torch.testing.assert_close(adversarial.per_item[name], values.detach(), rtol=1e-9, atol=0)
    weights = parts.generator_loss.weights
    weighted = sum(weights[name] * values.sum() / BATCH for name, values in per_item.items())
    want, = torch.autograd.grad(weighted, y)
    torch.testing.assert_close(adversarial.output_grads["weighted"], want, rtol=1e-9, atol=1e-15)

    # With an update, the same fake pass also trains the discriminator on the detached fake:
    # the audio's gradient is the same as without it, the discriminator's is its hinge loss's.
    updated = discriminate(parts, runtime, x, y, BATCH, VIEWS, update_disc=True)
    assert y.grad is None
    torch.testing.assert_close(updated.output_grads["weighted"], want, rtol=1e-9, atol=1e-15)
    logits = disc(torch.cat([x, y.detach()]))[0]
    n = x.shape[0]
    loss_d = discriminator_loss([l[:n] for l in logits], [l[n:] for l in logits]).sum() / BATCH
    loss_d.backward()
    assert updated.loss_d.item() == pytest.approx(loss_d.item(), rel=1e-9)
    for got, expected in zip(parts.raw_disc.parameters(), disc.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-9, atol=1e-15)
    assert all(p.requires_grad for p in parts.raw_disc.parameters())


def test_the_balancer_gets_each_adversarial_losss_own_gradient(float64):
    cfg, runtime, parts = tiny_setup(["balancer.enabled=true"])
    wavs, _ = make_batch(cfg)
    x = wavs.flatten(0, 1)
    y = (x + 0.01 * torch.randn_like(x)).requires_grad_()
    adversarial = discriminate(parts, runtime, x, y, BATCH, VIEWS, update_disc=True)
    fake_logits, fake_fmaps = parts.raw_disc(y)
    real_fmaps = parts.raw_disc(x)[1]
    for name, loss in (("l_g", generator_adv_loss(fake_logits)),
                       ("l_feat", feature_matching_loss(real_fmaps, fake_fmaps))):
        want, = torch.autograd.grad(loss.sum() / BATCH, y, retain_graph=True)
        torch.testing.assert_close(adversarial.output_grads[name], want, rtol=1e-9, atol=1e-15)


def test_discriminator_stays_trainable_when_its_frozen_pass_raises():
    cfg, runtime, parts = tiny_setup()
    wavs, _ = make_batch(cfg)
    x = wavs.flatten(0, 1)
    first = parts.raw_disc.discriminators[0]
    real_forward = first.forward
    calls = []

    def fails_on_the_fake_pass(audio):
        calls.append(audio)
        if len(calls) == 2:  # the real pass is first, the frozen fake pass second
            raise RuntimeError("out of memory")
        return real_forward(audio)

    first.forward = fails_on_the_fake_pass
    with pytest.raises(RuntimeError, match="out of memory"):
        discriminate(parts, runtime, x, x.clone(), BATCH, VIEWS, update_disc=False)
    assert all(p.requires_grad for p in parts.raw_disc.parameters())


def test_compile_compiles_each_discriminator_scale_in_place():
    _, _, parts = tiny_setup(["common.compile=true"])
    assert all(scale._compiled_call_impl is not None for scale in parts.raw_disc.discriminators)
    _, _, plain = tiny_setup()
    assert all(scale._compiled_call_impl is None for scale in plain.raw_disc.discriminators)


def test_compile_traces_the_encoder_and_the_decoder_whole_and_leaves_the_quantizer_eager():
    import torch._dynamo
    cfg, _, parts = tiny_setup(["common.compile=true"])
    model = parts.raw_model
    assert parts.model is model and model.quantizer._compiled_call_impl is None
    audio = make_batch(cfg)[0].flatten(0, 1)
    for stack, x in ((model.encoder, audio), (model.decoder, model.encoder(audio).detach())):
        assert stack._compiled_call_impl is not None
        explained = torch._dynamo.explain(stack.forward)(x)
        assert ((explained.graph_count, explained.graph_break_count)
                == (1, 0)), explained.break_reasons


def test_a_compiled_step_computes_what_the_eager_step_computes(float64, monkeypatch):
    # Dynamo's graphs and AOT autograd's forward and backward, without inductor's code
    # generation (minutes on 2 cores): what our wiring decides is what is checked here.
    compile_in_place = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compile_in_place(self, **{"backend": "aot_eager", **kw}))
    cfg, runtime, compiled = tiny_setup(["model.kmeans_buffer=0", "common.compile=true"])
    _, _, eager = tiny_setup(["model.kmeans_buffer=0"])
    wavs, metas = make_batch(cfg)
    results = []
    for parts in (compiled, eager):  # an update step: every pass of the generator and discriminator
        torch.manual_seed(0)  # dead-code draws, the same in both
        results.append(train_step(parts, runtime, wavs, metas, step=0, adversarial=True,
                                  update_disc=True, grad_clip=0.0, bins=cfg.model.bins))
    got, want = results
    assert got.ok and want.ok
    for name, value in want.scalars.items():
        assert got.scalars[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name
    for part in ("raw_model", "raw_disc"):
        for (name, mine), theirs in zip(getattr(compiled, part).named_parameters(),
                                        getattr(eager, part).parameters()):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-7, atol=1e-12,
                                       msg=f"{part}.{name}")
    for (name, mine), theirs in zip(compiled.raw_model.named_buffers(), eager.raw_model.buffers()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-9, msg=name)


def test_frozen_restores_each_parameters_own_flag():
    module = torch.nn.Linear(2, 2)
    module.bias.requires_grad_(False)
    with pytest.raises(ValueError):
        with frozen(module):
            assert not any(p.requires_grad for p in module.parameters())
            raise ValueError
    assert module.weight.requires_grad and not module.bias.requires_grad


# ----------------------------------------------------------------------------------------
# Schedules


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(warmup_steps=4, total_steps=12)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(8) == pytest.approx(0.5)  # half way through the cosine
    assert schedule(12) == pytest.approx(0.0) and schedule(30) == pytest.approx(0.0)
    after = [schedule(s) for s in range(4, 13)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert WarmupCosine(warmup_steps=0, total_steps=10)(0) == pytest.approx(1.0)


def test_the_pairwise_heads_learn_at_head_lr_while_the_model_follows_the_schedule():
    cfg, _, parts = tiny_setup(["pairwise.ild_head.enabled=true", "pairwise.head_lr=0.002"])
    model_group, head_group = parts.opt_g.param_groups
    assert ({id(p) for p in head_group["params"]} == {id(p) for p in parts.pairwise.parameters()}
            and len(model_group["params"]) == len(list(parts.raw_model.parameters())))
    total = parts.schedule.total_steps
    for step in (0, 1, total // 2, total - 1):
        set_learning_rates(parts, step)
        assert model_group["lr"] == pytest.approx(cfg.optimization.lr * parts.schedule(step))
        assert head_group["lr"] == 0.002
    _, _, scheduled = tiny_setup(["pairwise.ild_head.enabled=true"])  # head_lr: null
    set_learning_rates(scheduled, 1)
    assert ([g["lr"] for g in scheduled.opt_g.param_groups]
            == pytest.approx([cfg.optimization.lr * scheduled.schedule(1)] * 2))


def test_discriminator_starts_after_warmup_unless_told_otherwise():
    cfg = make_config("config_paired_nq2", ["lr_scheduler.warmup_epoch=5"], tiny=False)
    assert engine.discriminator_start_epoch(cfg) == 6
    cfg.discriminator.start_epoch = 3
    assert engine.discriminator_start_epoch(cfg) == 3


# ----------------------------------------------------------------------------------------
# Two ranks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_on_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = prepare_config(make_config("config_paired_nq2", [
            "datasets.data_root=unused", "pairwise.channel_classifier.enabled=true"]))
        seed_everything(cfg.common.seed + rank)  # as engine.train: every rank draws differently
        parts = build_parts(cfg, Runtime(torch.device("cpu"), rank, world), steps_per_epoch=10)
        torch.save({"pairwise": parts.pairwise.state_dict(), "model": parts.raw_model.state_dict()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_builds_the_same_channel_classifier_head(tmp_path):
    mp.spawn(build_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert any(name.startswith("classifier.") for name in ranks[0]["pairwise"]), "no head built"
    for part in ("pairwise", "model"):
        for name, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][name]), f"{part}.{name} differs between ranks"


# ----------------------------------------------------------------------------------------
# Normalisation and starting points


def test_gain_jitter_scales_each_item_within_its_range_and_views_alike():
    cfg, runtime, parts = tiny_setup(SEED_RECIPE)
    wavs, _ = level_pair(cfg)
    x = wavs.flatten(0, 1)
    model, shared_scale = parts.raw_model, parts.pairwise.shared_scale
    # the seed recipe: each view its RMS
    assert normalisation_scale(model, x, VIEWS, shared_scale) is None
    own = parts.raw_model.normalize(x)[1]
    torch.manual_seed(1)
    jittered = normalisation_scale(model, x, VIEWS, shared_scale, gain_jitter_db=6.0)
    gain_db = 20 * torch.log10(own / jittered).flatten()
    assert gain_db.abs().max() <= 6.0 and gain_db.std() > 0.5
    assert torch.allclose(gain_db[0::2], gain_db[1::2])  # one gain per item, for all its views
    _, _, shared = tiny_setup(CONTRASTIVE)
    torch.manual_seed(1)
    both = normalisation_scale(shared.raw_model, x, VIEWS, shared.pairwise.shared_scale,
                               gain_jitter_db=6.0)
    torch.testing.assert_close(
        20 * torch.log10(shared.raw_model.shared_scale(x, VIEWS) / both).flatten(),
        gain_db)  # same draws on top of the pair's common RMS


def test_a_toolkit_checkpoint_is_a_starting_point_for_generator_and_discriminator(tmp_path):
    cfg, _, parts = tiny_setup()
    with torch.no_grad():
        for param in [*parts.raw_model.parameters(), *parts.raw_disc.parameters()]:
            param.add_(torch.randn_like(param))
    start = tmp_path / "start.pt"
    torch.save({"model": parts.raw_model.state_dict(), "discriminator": parts.raw_disc.state_dict(),
                "config": {}}, start)
    _, _, started = tiny_setup([f"model.init_from={start}"])
    for module, want in ((started.raw_model, parts.raw_model), (started.raw_disc, parts.raw_disc)):
        for (name, got), expected in zip(module.state_dict().items(), want.state_dict().values()):
            torch.testing.assert_close(got, expected, msg=name)
    with pytest.raises(ValueError, match="does not fit the model"):
        tiny_setup([f"model.init_from={start}", "model.dimension=8"])


def test_an_exported_start_point_holds_the_weights_only_and_starts_the_same_codec(tmp_path):
    from utils import checkpoints
    cfg, _, parts = tiny_setup()
    wavs, _ = make_batch(cfg)
    init_codebooks(parts, wavs)
    training = tmp_path / "ckpt.pt"
    torch.save({"model": parts.raw_model.state_dict(), "discriminator": parts.raw_disc.state_dict(),
                "config": {}, "opt_g": parts.opt_g.state_dict(), "step": 7}, training)
    start = checkpoints.export_start_point(training, tmp_path / "start.pt")
    saved = torch.load(start, weights_only=True)
    assert (set(saved) == {"model", "discriminator", "config", "source"}
            and saved["source"]["step"] == 7)
    _, _, started = tiny_setup([f"model.init_from={start}"])
    x = wavs.flatten(0, 1)
    with torch.no_grad():
        assert torch.equal(started.raw_model.eval().encode(x), parts.raw_model.eval().encode(x))
    for (name, got), want in zip(started.raw_disc.state_dict().items(),
                                 parts.raw_disc.state_dict().values()):
        assert torch.equal(got, want), name
