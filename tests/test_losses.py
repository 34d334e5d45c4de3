"""Per-item reconstruction / adversarial losses and the gradient balancer."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
import torchaudio
from omegaconf import open_dict

from modules import losses
from modules.balancer import Balancer

SR = 24000
T = 1920  # the tiny preset's segment: more than half of the largest mel window (2048)


@pytest.fixture(scope="module")
def mel_loss() -> losses.MelLoss:
    return losses.MelLoss(SR)


# ----------------------------------------------------------------------------- reconstruction

def test_time_loss_is_per_item_l1():
    x = torch.zeros(2, 1, 4)
    y = torch.tensor([[[1., -1., 1., -1.]], [[0., 0., 0., 2.]]])
    torch.testing.assert_close(losses.time_loss(x, y), torch.tensor([1.0, 0.5]))
    assert losses.time_loss(y, y).abs().max() == 0


def test_time_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        losses.time_loss(torch.zeros(2, 1, 4), torch.zeros(2, 1, 5))


def test_mel_loss_zero_for_identical_and_grows_with_error(mel_loss):
    torch.manual_seed(0)
    x = torch.randn(3, 1, T)
    noise = torch.randn_like(x)
    assert mel_loss(x, x).abs().max() == 0
    small, large = mel_loss(x, x + 0.01 * noise), mel_loss(x, x + 0.5 * noise)
    assert small.shape == (3,) and (small > 0).all() and (large > small).all()


def test_mel_loss_is_per_item(mel_loss):
    torch.manual_seed(0)
    x, y = torch.randn(3, 1, T), torch.randn(3, 1, T)
    batch = mel_loss(x, y)
    alone = torch.cat([mel_loss(x[i:i + 1], y[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, alone)


def test_mel_loss_builds_transforms_once_and_does_not_warn(monkeypatch):
    # The tiny windows really do produce torchaudio's empty-filterbank warning ...
    with pytest.warns(UserWarning, match="all zero"):
        torchaudio.transforms.MelSpectrogram(SR, n_fft=32, hop_length=8, n_mels=64)
    # ... but MelLoss silences exactly that one, at construction, and builds nothing later.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = losses.MelLoss(SR)
        assert len(module.transforms) == 7
        assert [t.spectrogram.n_fft for t in module.transforms] == [2 ** i for i in range(5, 12)]
        before = [id(t) for t in module.transforms]

        def no_building(*args, **kwargs):
            raise AssertionError("a transform or filterbank was built inside forward")

        monkeypatch.setattr(torchaudio.transforms.MelSpectrogram, "__init__", no_building)
        monkeypatch.setattr(torchaudio.functional, "melscale_fbanks", no_building)
        x = torch.randn(2, 1, T)
        module(x, 0.5 * x)
        module(x, 0.9 * x)
    assert [id(t) for t in module.transforms] == before


def scene_pair(length: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different 1/f-coloured noise segments, like two scene recordings: [1, 1, length]."""
    gen = torch.Generator().manual_seed(0)
    spectrum = torch.fft.rfft(torch.randn(2, length, generator=gen))
    spectrum /= torch.arange(1, spectrum.shape[-1] + 1).sqrt()
    x, y = torch.fft.irfft(spectrum, n=length)[:, None, None]
    return 0.1 * x / x.abs().max(), 0.1 * y / y.abs().max()


def test_mel_loss_no_single_window_dominates():
    """An unnormalised STFT's magnitudes grow with the window: on two segments of one scene
    the L1 term was 0.005 at window 32 and 1.5 at 2048, and the 2048 window's loss was 4x
    the 32 window's. Normalised, each window counts about the same."""
    x, y = scene_pair()
    smallest, largest = (losses.MelLoss(SR, min_exp=i, max_exp=i)(x, y).item() for i in (5, 11))
    assert 0.5 < largest / smallest < 2, (smallest, largest)


def test_mel_loss_is_normalised_stft_l1_plus_log10_mse_with_floor_inside():
    """The definition, written out: EnCodec's mel loss (normalised STFT, 64 bins, windows
    32 .. 2048, hop window / 4), log term as in audiocraft: log10(1e-5 + mel), which keeps a
    gradient where the reconstruction is below the floor (log(max(mel, 1e-5)) has none)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, T), 1e-4 * torch.randn(2, 1, T)  # y mostly below the floor
    expected = torch.zeros(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty filterbanks at the small windows
        for i in range(5, 12):
            mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=2 ** i, win_length=2 ** i,
                                                       hop_length=2 ** i // 4,
                                                       n_mels=64, power=1.0, normalized=True)
            mx, my = mel(x), mel(y)
            expected += (mx - my).abs().flatten(1).mean(1)
            expected += ((torch.log10(1e-5 + mx) - torch.log10(1e-5 + my)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(losses.MelLoss(SR)(x, y), expected / 7)


def test_mel_loss_float32_under_bf16_autocast(mel_loss):
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, T), torch.randn(2, 1, T)
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        out = mel_loss(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mel_loss(x.bfloat16().float(), y.bfloat16().float()))


def test_mel_loss_too_short_names_tensor_cut(mel_loss):
    with pytest.raises(ValueError, match="tensor_cut"):
        mel_loss(torch.zeros(1, 1, 512), torch.zeros(1, 1, 512))


# ----------------------------------------------------------------------------- adversarial

# Two scales, two items. Scale 1: item 0 -> [0.5, 2.0], item 1 -> [-1.0, 0.0].
# Scale 2: [3.0], [0.0].
LOGITS = [torch.tensor([[[[0.5, 2.0]]], [[[-1.0, 0.0]]]]),
          torch.tensor([[[[3.0]]], [[[0.0]]]])]


def test_generator_hinge_on_known_logits():
    # relu(1 - x): scale 1 -> 0.25, 1.5; scale 2 -> 0, 1; mean over scales.
    torch.testing.assert_close(losses.generator_adv_loss(LOGITS), torch.tensor([0.125, 1.25]))


def test_discriminator_hinge_on_known_logits():
    fake = [-logit for logit in LOGITS]
    # relu(1 - real) + relu(1 + fake) with fake = -real: twice the generator value.
    torch.testing.assert_close(losses.discriminator_loss(LOGITS, fake), torch.tensor([0.25, 2.5]))
    # A perfect discriminator (real >= 1, fake <= -1) has zero loss.
    perfect = losses.discriminator_loss([torch.full((2, 1, 3, 3), 1.5)],
                                        [torch.full((2, 1, 3, 3), -2.0)])
    assert perfect.abs().max() == 0


def test_feature_matching_is_relative_l1_on_known_features():
    real = [[torch.tensor([[1., -1., 2., -2.]]), torch.tensor([[2., 2., 2., 2.]])]]
    fake = [[torch.zeros(1, 4), torch.ones(1, 4)]]
    # layer 1: 1.5 / 1.5 = 1; layer 2: 1 / 2 = 0.5; mean 0.75.
    torch.testing.assert_close(losses.feature_matching_loss(real, fake), torch.tensor([0.75]))
    # Relative: scaling real and fake together does not change the loss.
    scaled = losses.feature_matching_loss([[10 * f for f in real[0]]], [[10 * f for f in fake[0]]])
    torch.testing.assert_close(scaled, torch.tensor([0.75]))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_fused_relative_l1_is_the_feature_matching_term_and_its_gradient(layout):
    torch.manual_seed(0)
    real = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    fake = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    if layout == "channels_last":
        real, fake = (t.contiguous(memory_format=torch.channels_last) for t in (real, fake))
    elif layout == "strided":  # another layout on one side: the fallback path
        fake = fake.transpose(2, 3).contiguous().transpose(2, 3)
    fake.requires_grad_()
    upstream = torch.randn(3, dtype=torch.float64)

    plain = losses.feature_matching_loss([[real]], [[fake]])
    want, = torch.autograd.grad((plain * upstream).sum(), fake)
    fused = losses.relative_l1(fake, real)
    got, = torch.autograd.grad((fused * upstream).sum(), fake)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # The real side is a target: no gradient reaches it even when it has one.
    real.requires_grad_()
    losses.relative_l1(fake, real).sum().backward()
    assert real.grad is None


def test_fused_hinges_are_the_adversarial_losses():
    fake = [-logit for logit in LOGITS]
    per_scale_g = [losses.hinge_real(logit) for logit in LOGITS]
    torch.testing.assert_close(torch.stack(per_scale_g).mean(0), losses.generator_adv_loss(LOGITS))
    per_scale_d = [losses.hinge_real(r) + losses.hinge_fake(f) for r, f in zip(LOGITS, fake)]
    torch.testing.assert_close(torch.stack(per_scale_d).mean(0),
                               losses.discriminator_loss(LOGITS, fake))
    assert losses.hinge_real(LOGITS[0].bfloat16()).dtype == torch.float32  # sums in float32


# ----------------------------------------------------------------------------- GeneratorLoss

def test_generator_loss_from_config(cfg_factory):
    cfg = cfg_factory("config_paired_nq2")
    gen_loss = losses.GeneratorLoss.from_config(cfg.losses, sample_rate=cfg.model.sample_rate)
    assert gen_loss.weights == {'l_t': 0.1, 'l_f': 1.0, 'l_g': 3.0, 'l_feat': 3.0}
    assert gen_loss.commit_weight == 1.0
    torch.manual_seed(0)
    x = torch.randn(4, 1, T)

    no_disc = gen_loss(x, x)
    assert set(no_disc) == {'l_t', 'l_f'}  # adversarial terms absent without a discriminator
    assert no_disc['l_t'].shape == no_disc['l_f'].shape == (4,)
    assert no_disc['l_t'].abs().max() == 0 and no_disc['l_f'].abs().max() == 0

    fmaps = [[torch.randn(4, 2, 3, 3)]]
    y = x + 0.1 * torch.randn_like(x)
    logits = [torch.cat([logit, logit]) for logit in LOGITS]
    out = gen_loss(x, y, logits_fake=logits, fmaps_real=fmaps, fmaps_fake=[[fmaps[0][0] + 1]])
    assert set(out) == {'l_t', 'l_f', 'l_g', 'l_feat'}
    expected = sum(gen_loss.weights[k] * out[k] for k in out)
    torch.testing.assert_close(gen_loss.weighted_sum(out), expected)
    with pytest.raises(ValueError, match="both fmaps_real and fmaps_fake"):
        gen_loss(x, y, fmaps_real=fmaps)


def test_generator_loss_missing_weight_names_the_key(cfg_factory):
    cfg = cfg_factory("config_paired_nq2")
    with open_dict(cfg):
        del cfg.losses['l_feat']
    with pytest.raises(ValueError, match="losses.l_feat"):
        losses.GeneratorLoss.from_config(cfg.losses, sample_rate=cfg.model.sample_rate)


# ----------------------------------------------------------------------------- balancer

class TinyGenerator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def step_losses(model, x):
    """Two losses of the output only, and one ('rest') that needs the parameters directly."""
    out = model(x)
    output_losses = {'l_t': (out - x).abs().mean(), 'l_f': 50.0 * ((out - 2 * x) ** 2).mean()}
    rest = 0.3 * model.conv.weight.pow(2).sum()
    return out, output_losses, rest


def item_norm(grad):
    return grad.flatten(1).norm(dim=1).mean().item()


def test_balancer_total_gradient_counts_every_loss_once():
    torch.manual_seed(0)
    model = TinyGenerator()
    weights = {'l_t': 0.1, 'l_f': 1.0}
    balancer = Balancer(weights, ema_decay=0.9, total_norm=2.0)
    xs = [torch.randn(4, 1, 16), torch.randn(4, 1, 16)]
    ema = {k: [0.0, 0.0] for k in weights}  # decayed sum, decayed count
    for x in xs:
        # Balanced step, as the engine runs it: one backward over [output, rest].
        model.zero_grad()
        out, output_losses, rest = step_losses(model, x)
        grad = balancer.balanced_grad(output_losses, out)
        torch.autograd.backward([out, rest], [grad, torch.ones_like(rest)])
        balanced = [p.grad.clone() for p in model.parameters()]

        # By hand: normalized per-loss gradients at the output, plus the plain gradient of rest.
        out, output_losses, rest = step_losses(model, x)
        injected = torch.zeros_like(out)
        for name, loss in output_losses.items():
            g, = torch.autograd.grad(loss, out, retain_graph=True)
            ema[name] = [ema[name][0] * 0.9 + item_norm(g), ema[name][1] * 0.9 + 1]
            scale = 2.0 * weights[name] / sum(weights.values()) / (ema[name][0] / ema[name][1])
            injected += scale * g
        by_hand = torch.autograd.grad((out * injected).sum() + rest, list(model.parameters()),
                                      retain_graph=True)
        for got, want in zip(balanced, by_hand):
            torch.testing.assert_close(got, want)

        # Backpropagating the raw weighted losses on top would count them twice: not what happens.
        raw = torch.autograd.grad(sum(weights[k] * v for k, v in output_losses.items()),
                                  list(model.parameters()))
        assert not torch.allclose(balanced[0], by_hand[0] + raw[0])


def test_balancer_backward_matches_balanced_grad_plus_rest():
    torch.manual_seed(0)
    model = TinyGenerator()
    x = torch.randn(2, 1, 16)
    out, output_losses, rest = step_losses(model, x)
    Balancer({'l_t': 1.0, 'l_f': 1.0}).backward(output_losses, out, rest)
    via_helper = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out, output_losses, rest = step_losses(model, x)
    grad = Balancer({'l_t': 1.0, 'l_f': 1.0}).balanced_grad(output_losses, out)
    torch.autograd.backward([out, rest], [grad, torch.ones_like(rest)])
    for got, want in zip(via_helper, model.parameters()):
        torch.testing.assert_close(got, want.grad)


def test_balancer_alone_a_loss_gets_the_whole_norm_whatever_its_scale():
    torch.manual_seed(0)
    output = torch.randn(3, 1, 32, requires_grad=True)
    balancer = Balancer({'l_t': 1.0, 'l_f': 3.0}, total_norm=1.0)
    grad_t = balancer.balanced_grad({'l_t': 1e4 * output.abs().mean()}, output)
    balancer2 = Balancer({'l_t': 1.0, 'l_f': 3.0}, total_norm=1.0)
    grad_f = balancer2.balanced_grad({'l_f': 1e-4 * output.pow(2).mean()}, output)
    # On the first step a loss alone (its share of the call's weights is 1) gets total_norm.
    assert item_norm(grad_t) == pytest.approx(1.0, rel=1e-5)
    assert item_norm(grad_f) == pytest.approx(1.0, rel=1e-5)
    both = Balancer({'l_t': 1.0, 'l_f': 3.0}).balanced_grad(
        {'l_t': 1e4 * output.abs().mean(), 'l_f': 1e-4 * output.pow(2).mean()}, output)
    assert item_norm(both) <= 1.0 + 1e-5


def test_balancer_splits_the_gradient_1_to_3_whatever_the_loss_scales():
    """Weights 1:3 give l_t a quarter and l_f three quarters of the total norm, although l_t
    is 1e8 times larger. The two losses depend on disjoint halves of the output, so each
    one's share can be read off its half of the injected gradient."""
    torch.manual_seed(0)
    output = torch.randn(4, 1, 32, requires_grad=True)
    balancer = Balancer({'l_t': 1.0, 'l_f': 3.0}, total_norm=1.0)
    grad = balancer.balanced_grad({'l_t': 1e4 * output[..., :16].abs().mean(),
                                   'l_f': 1e-4 * output[..., 16:].pow(2).mean()}, output)
    assert item_norm(grad[..., :16]) == pytest.approx(0.25, rel=1e-5)
    assert item_norm(grad[..., 16:]) == pytest.approx(0.75, rel=1e-5)


def test_balancer_state_round_trip_weights_only():
    torch.manual_seed(0)
    output = torch.randn(2, 1, 16, requires_grad=True)
    original = Balancer({'l_t': 0.1, 'l_f': 1.0}, ema_decay=0.5)
    for scale in (1.0, 5.0, 0.3):
        original.balanced_grad({'l_t': scale * output.abs().mean(),
                                'l_f': output.pow(2).mean()}, output)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = Balancer({'l_t': 0.1, 'l_f': 1.0}, ema_decay=0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state_dict() == original.state_dict()
    next_losses = lambda: {'l_t': 2.0 * output.abs().mean(), 'l_f': output.pow(2).mean()}
    torch.testing.assert_close(restored.balanced_grad(next_losses(), output),
                               original.balanced_grad(next_losses(), output))
    fresh = Balancer({'l_t': 0.1, 'l_f': 1.0}, ema_decay=0.5).balanced_grad(next_losses(), output)
    assert not torch.allclose(fresh, original.balanced_grad(next_losses(), output))


def test_balancer_from_config_and_errors(cfg_factory):
    cfg = cfg_factory("config_paired_nq2", ["balancer.ema_decay=0.99", "balancer.total_norm=2.0"])
    weights = losses.GeneratorLoss.from_config(cfg.losses,
                                               sample_rate=cfg.model.sample_rate).weights
    balancer = Balancer.from_config(cfg.balancer, weights)
    assert balancer.weights == {'l_t': 0.1, 'l_f': 1.0, 'l_g': 3.0, 'l_feat': 3.0}
    assert (balancer.ema_decay, balancer.total_norm) == (0.99, 2.0)
    output = torch.randn(2, 1, 8, requires_grad=True)
    with pytest.raises(KeyError, match="commit"):
        balancer.balanced_grad({'commit': output.mean()}, output)
    with pytest.raises(ValueError, match="scalar"):
        balancer.balanced_grad({'l_t': output.abs().flatten(1).mean(1)}, output)
