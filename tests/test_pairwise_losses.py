"""Pairwise similarity / diversity losses, InfoNCE, cross-reconstruction, level-difference
heads and cue fidelity, K-view averaging and PairwiseLoss options (the `pairwise=` config
group: test_pairwise_config.py)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from omegaconf import open_dict

from conftest import make_config
from modules.pairwise_heads import LevelDifferenceHead, level_difference_loss, reverse_gradient
from modules.pairwise_terms import (centred_cosine, code_consensus, diversity_loss, info_nce,
                                    similarity_loss, swap_latents)
from modules.views import split_views
from pairwise_losses import PairwiseLoss, Terms
from training.configuration import prepare_config
from utils.checks import ConfigError

# One item, D = 2, F = 2. Frames of a: (1, 0), (0, 1); frames of b: (0, 1), (0, 2).
A = torch.tensor([[[1., 0.], [0., 1.]]])
B = torch.tensor([[[0., 0.], [1., 2.]]])
# mse: differences (1, -1), (0, -1) -> (1 + 1 + 0 + 1) / 4 = 0.75
# cosine per frame: 0 and 1 -> mean 0.5


def pairwise_losses(*views, sim_weight: float = 0.5, div_weight: float = 0.5,
                    **options) -> dict[str, torch.Tensor]:
    """The design document's call, `pairwise_losses(emb1, emb2, sim_weight=.5, div_weight=.5)`:
    `PairwiseLoss`'s terms of the views' embeddings with these weights."""
    loss = PairwiseLoss(sim_weight=sim_weight, div_weight=div_weight, **options)
    return loss.embedding_terms(list(views), step=0)


def scheduled(loss: PairwiseLoss, terms: Terms, step: int) -> dict[str, torch.Tensor]:
    """`terms` weighted as `loss` weighs them at optimizer step `step`."""
    return loss.weigh(terms, loss.schedule_factor(step))


def config_error(*overrides: str) -> str:
    """The error of preparing the paired config with `overrides`."""
    with pytest.raises(ConfigError) as error:
        prepare_config(make_config("config_paired_nq2", ["datasets.data_root=unused", *overrides]))
    return str(error.value)


def random_views(num_views: int, batch: int = 3, n_q: int = 2, dim: int = 4, frames: int = 5,
                 requires_grad: bool = False) -> list[list[torch.Tensor]]:
    return [[torch.randn(batch, dim, frames, requires_grad=requires_grad) for _ in range(n_q)]
            for _ in range(num_views)]


def test_hand_made_values():
    assert similarity_loss(A, B, 'mse').item() == pytest.approx(0.75)
    assert similarity_loss(A, B, 'cosine').item() == pytest.approx(0.5)
    assert diversity_loss(A, B, 'neg_mse').item() == pytest.approx(-0.75)
    assert diversity_loss(A, B, 'cosine').item() == pytest.approx(0.5)
    assert diversity_loss(A, B, 'margin', margin=1.0).item() == pytest.approx(0.25)
    assert diversity_loss(A, B, 'margin', margin=0.5).item() == 0.0


def test_reduction_none_is_per_item():
    a, b = torch.cat([A, A]), torch.cat([B, A])
    torch.testing.assert_close(similarity_loss(a, b, 'mse', reduction='none'),
                               torch.tensor([0.75, 0.0]))
    torch.testing.assert_close(diversity_loss(a, b, 'neg_mse', reduction='none'),
                               torch.tensor([-0.75, 0.0]))
    with pytest.raises(ValueError, match="reduction"):
        similarity_loss(a, b, reduction='sum')


def test_identical_views_have_zero_similarity_loss():
    torch.manual_seed(0)
    view = random_views(1)[0]
    for kind in ('mse', 'cosine'):
        out = pairwise_losses(view, [e.clone() for e in view], sim_kind=kind)
        assert out['l_sim'].abs().item() < 1e-6


def test_design_document_two_channel_call():
    torch.manual_seed(0)
    emb1, emb2 = random_views(2)
    out = pairwise_losses(emb1, emb2, sim_weight=.5, div_weight=.5)
    torch.testing.assert_close(out['l_sim'], 0.5 * similarity_loss(emb1[0], emb2[0]))
    torch.testing.assert_close(out['l_div'], -0.5 * similarity_loss(emb1[1], emb2[1]))
    assert out['l_div'] < 0  # sign convention of neg_mse


def test_diversity_gradient_reaches_channel_codebook_and_pushes_apart():
    torch.manual_seed(0)
    emb1, emb2 = random_views(2, requires_grad=True)
    out = pairwise_losses(emb1, emb2)
    out['l_div'].backward()
    assert emb1[1].grad.abs().sum() > 0 and emb2[1].grad.abs().sum() > 0
    assert emb1[0].grad is None  # the content codebook only sees l_sim
    with torch.no_grad():  # one descent step on l_div moves the channel embeddings apart
        before = similarity_loss(emb1[1], emb2[1])
        after = similarity_loss(emb1[1] - 0.1 * emb1[1].grad, emb2[1] - 0.1 * emb2[1].grad)
    assert after > before


def test_margin_diversity_is_bounded_and_flat_once_satisfied():
    torch.manual_seed(0)
    a = torch.randn(4, 3, 5, requires_grad=True)
    near = (a.detach() + 0.01 * torch.randn(4, 3, 5)).requires_grad_()
    far = (a.detach() + 10.0).requires_grad_()
    assert diversity_loss(a, near, 'margin', margin=1.0) > 0
    satisfied = diversity_loss(a, far, 'margin', margin=1.0)
    assert satisfied.item() == 0.0
    satisfied.backward()
    assert a.grad.abs().max() == 0 and far.grad.abs().max() == 0
    # Unlike neg_mse, pushing further apart can never take it below zero.
    assert diversity_loss(a, a.detach() + 1e3, 'margin') == 0
    assert diversity_loss(a, a.detach() + 1e3, 'neg_mse') < -1e5


def test_cosine_diversity_is_bounded():
    torch.manual_seed(0)
    a = torch.randn(4, 3, 5)
    assert diversity_loss(a, -7 * a, 'cosine').item() == pytest.approx(-1.0, abs=1e-6)
    assert diversity_loss(a, 3 * a, 'cosine').item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("sim_kind, div_kind", [('mse', 'margin'), ('infonce', 'cos_hinge')])
def test_k_views_average_all_pairs(sim_kind, div_kind):
    torch.manual_seed(0)
    views = random_views(3)
    kinds = dict(sim_kind=sim_kind, div_kind=div_kind, margin=3.0, max_cosine=-0.2)
    out = pairwise_losses(*views, sim_weight=1.0, div_weight=1.0, **kinds)
    pairs = list(itertools.combinations(views, 2))
    assert len(pairs) == 3
    sims = [pairwise_losses(u, v, sim_weight=1.0, div_weight=1.0, **kinds) for u, v in pairs]
    torch.testing.assert_close(out['l_sim'], torch.stack([s['l_sim'] for s in sims]).mean())
    torch.testing.assert_close(out['l_div'], torch.stack([s['l_div'] for s in sims]).mean())


def test_clear_errors_for_bad_views():
    torch.manual_seed(0)
    emb1, emb2 = random_views(2, n_q=1)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_losses(emb1)
    with pytest.raises(ValueError, match="channel_codebook=1.*model.n_q"):
        pairwise_losses(emb1, emb2)
    with pytest.raises(ValueError, match="content_codebook=-1"):
        pairwise_losses(emb1, emb2, content_codebook=-1, channel_codebook=0)
    with pytest.raises(ValueError, match="list of per-codebook"):
        pairwise_losses(emb1[0], emb2[0])  # a bare [B, D, F] tensor would index items
    with pytest.raises(ValueError, match="pairwise.div_kind"):
        pairwise_losses(*random_views(2), div_kind='hinge')


def test_split_views_follows_view_major_order():
    batch, views, n_q = 2, 3, 2
    # Item b, view v sits at row b * V + v; fill each row with its own index.
    flat = [torch.arange(batch * views, dtype=torch.float32).view(-1, 1, 1).expand(-1, 4, 5)
            + 100 * k for k in range(n_q)]
    split = split_views(flat, views)
    assert len(split) == views and all(len(view) == n_q for view in split)
    for v in range(views):
        for k in range(n_q):
            assert split[v][k].shape == (batch, 4, 5)
            assert split[v][k][:, 0, 0].tolist() == [b * views + v + 100 * k for b in range(batch)]
    with pytest.raises(ValueError, match="datasets.views"):
        split_views(flat, 4)


# ----------------------------------------------------------------------------- PairwiseLoss

def test_from_config_seed_recipe_is_the_design_documents_function(cfg_factory):
    cfg = cfg_factory("config_paired_nq2", ["pairwise=seed"])
    loss = PairwiseLoss.from_config(cfg.pairwise, dimension=cfg.model.dimension)
    assert ((loss.weights['l_sim'], loss.weights['l_div'], loss.sim_kind, loss.div_kind)
            == (0.5, 0.5, 'mse', 'neg_mse'))
    assert loss.classifier is None and list(loss.parameters()) == []
    torch.manual_seed(0)
    views = random_views(2, requires_grad=True)
    out = loss.embedding_terms(views, step=0)
    assert set(out) == {'l_sim', 'l_div', 'sim', 'div'}
    torch.testing.assert_close(out['l_sim'], 0.5 * similarity_loss(views[0][0], views[1][0]))
    torch.testing.assert_close(out['l_div'], 0.5 * diversity_loss(views[0][1], views[1][1]))
    torch.testing.assert_close(out['sim'], similarity_loss(views[0][0], views[1][0]).detach())
    assert not out['sim'].requires_grad and not out['div'].requires_grad
    assert out['l_sim'].requires_grad and out['l_div'].requires_grad


def test_class_weights_scale_per_item_similarity():
    torch.manual_seed(0)
    views = random_views(2, batch=3)
    loss = PairwiseLoss(sim_weight=1.0, class_weights={'Beach': 3.0, 'Park': 0.0})
    per_item = similarity_loss(views[0][0], views[1][0], reduction='none')
    out = loss.embedding_terms(views, step=0,
                               classes=['Beach', 'Park', 'Woodland'])  # Woodland: unknown -> 1
    expected = torch.stack([3.0 * per_item[0], 0.0 * per_item[1], per_item[2]]).mean()
    torch.testing.assert_close(out['l_sim'], expected)
    torch.testing.assert_close(out['sim'], per_item.mean())  # logged value stays unweighted
    unweighted = loss.embedding_terms(views, step=0)
    torch.testing.assert_close(unweighted['l_sim'], per_item.mean())


def test_linear_schedule_ramps():
    torch.manual_seed(0)
    views = random_views(2)
    full = PairwiseLoss().embedding_terms(views, step=0)
    ramp = PairwiseLoss(schedule='linear', ramp_steps=10)
    assert ramp.embedding_terms(views, step=0)['l_sim'].item() == 0.0
    torch.testing.assert_close(ramp.embedding_terms(views, step=5)['l_sim'], 0.5 * full['l_sim'])
    torch.testing.assert_close(ramp.embedding_terms(views, step=5)['l_div'], 0.5 * full['l_div'])
    torch.testing.assert_close(ramp.embedding_terms(views, step=10)['l_div'], full['l_div'])
    torch.testing.assert_close(ramp.embedding_terms(views, step=1000)['l_sim'], full['l_sim'])
    torch.testing.assert_close(ramp.embedding_terms(views, step=5)['sim'],
                               full['sim'])  # logging unscaled
    assert "pairwise.ramp_steps" in config_error("pairwise.schedule=linear",
                                                 "pairwise.ramp_steps=0")
    assert "pairwise.schedule" in config_error("pairwise.schedule=cosine")
    assert "is also the content codebook" in config_error("pairwise.content_codebook=1",
                                                          "pairwise.channel_codebook=1")
    assert "pairwise.margin" in config_error("pairwise.div_kind=margin", "pairwise.margin=0.0")


def test_channel_classifier_learns_separable_channels(cfg_factory):
    cfg = cfg_factory("config_paired_nq2")
    with open_dict(cfg):
        cfg.pairwise.channel_classifier.enabled = True
        cfg.pairwise.channel_classifier.num_channels = 4
        cfg.pairwise.ild_head.enabled = False  # its targets are not given here
    torch.manual_seed(0)
    loss = PairwiseLoss.from_config(cfg.pairwise, dimension=8)
    assert loss.classifier is not None
    # Channel c's channel-codebook embedding points along axis c (plus noise).
    channels = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    views = [[torch.randn(4, 8, 5), 3 * torch.eye(8)[channels[:, v]].unsqueeze(-1)
              + 0.1 * torch.randn(4, 8, 5)] for v in range(2)]
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.1)
    first = None
    for _ in range(30):
        out = loss.embedding_terms(views, step=0, channels=channels)
        if first is None:
            first = out['cls'].item()
        optimizer.zero_grad()
        out['l_cls'].backward()
        optimizer.step()
    assert out['cls'].item() < 0.2 * first
    torch.testing.assert_close(out['l_cls'].detach(), 0.1 * out['cls'])
    logits = loss.classifier(views[0][1])
    assert logits.argmax(dim=1).tolist() == channels[:, 0].tolist()


def test_channel_classifier_errors():
    views = random_views(2, dim=4)
    with pytest.raises(ValueError, match="dimension"):
        PairwiseLoss(channel_classifier=True)
    loss = PairwiseLoss(channel_classifier=True, num_channels=4, dimension=4)
    with pytest.raises(ValueError, match="channels"):
        loss.embedding_terms(views, step=0)
    with pytest.raises(ValueError, match="num_channels=4"):
        loss.embedding_terms(views, step=0, channels=torch.tensor([[0, 1], [2, 7], [1, 0]]))
    with torch.no_grad():  # validation: the head term is left out rather than failing
        assert 'l_cls' not in loss.embedding_terms(views, step=0)


# ----------------------------------------------------------------------------- InfoNCE

def one_hot_views(batch: int, frames: int, dim: int = 8) -> torch.Tensor:
    """`[B, D, F]`: item i is the unit vector e_i in every frame (orthogonal items)."""
    return torch.eye(dim)[:batch].unsqueeze(-1).expand(-1, -1, frames).clone()


@pytest.mark.parametrize("pooling", ['frame', 'mean'])
@pytest.mark.parametrize("center", [True, False])
def test_infonce_collapsed_codebook_scores_chance(pooling, center):
    # One code for every frame of every item and channel: exactly chance, whatever the batch.
    for batch, frames in ((2, 3), (5, 7)):
        collapsed = torch.randn(1, 6, 1).expand(batch, -1, frames)
        out = info_nce(collapsed, collapsed.clone(), pooling=pooling, center=center)
        torch.testing.assert_close(out.loss, torch.ones(batch))
        assert out.accuracy.item() == 0.0  # a tie is not a positive ranked first


@pytest.mark.parametrize("pooling", ['frame', 'mean'])
def test_infonce_identical_views_reach_the_minimum(pooling):
    a = one_hot_views(batch=4, frames=3)
    out = info_nce(a, a.clone(), temperature=0.1, pooling=pooling)
    assert out.loss.max().item() < 1e-3 and out.accuracy.item() == 1.0
    # 0 is the bound (a log-softmax): identical well-separated views reach it. For views that
    # are not well separated a channel difference costs, the more the larger it is.
    torch.manual_seed(0)
    a = torch.randn(6, 8, 3)
    previous = info_nce(a, a.clone(), pooling=pooling).loss.mean()
    assert (info_nce(a, a + torch.randn_like(a), pooling=pooling).loss >= 0).all()
    for noise in (0.5, 1.0, 3.0):
        other = info_nce(a, a + noise * torch.randn_like(a), pooling=pooling).loss.mean()
        assert other > previous + 1e-3
        previous = other


def direct_info_nce(a: torch.Tensor, b: torch.Tensor, tau: float, pooling: str) -> torch.Tensor:
    """The definition, one anchor at a time: per-item normalised InfoNCE `[B]`."""
    batch, dim, frames = a.shape
    if pooling == 'mean':
        a, b, frames = a.mean(-1, keepdim=True), b.mean(-1, keepdim=True), 1
    mean = torch.cat([a, b]).mean(dim=(0, 2), keepdim=True)
    a, b = ((e - mean) / (e - mean).norm(dim=1, keepdim=True) for e in (a, b))
    per_item = torch.zeros(batch)
    for anchors, others in ((a, b), (b, a)):
        for i in range(batch):
            for f in range(frames):
                positive = anchors[i, :, f] @ others[i, :, f] / tau
                candidates = [positive] + [anchors[i, :, f] @ others[j, :, g] / tau
                                           for j in range(batch) if j != i for g in range(frames)]
                row = torch.logsumexp(torch.stack(candidates), 0) - positive
                per_item[i] += row / math.log(len(candidates)) / (2 * frames)
    return per_item


@pytest.mark.parametrize("pooling", ['frame', 'mean'])
def test_infonce_matches_a_direct_computation(pooling):
    torch.manual_seed(0)
    a = torch.randn(4, 6, 3) + 2.0  # an offset, as codebook vectors share a common part
    b = a + torch.randn(4, 6, 3)
    out = info_nce(a, b, temperature=0.3, pooling=pooling)
    torch.testing.assert_close(out.loss, direct_info_nce(a, b, 0.3, pooling))
    torch.testing.assert_close(info_nce(b, a, temperature=0.3, pooling=pooling).loss, out.loss)


@pytest.mark.parametrize("pooling", ['frame', 'mean'])
def test_infonce_negatives_are_the_other_segments_of_the_batch(pooling):
    # Segments 0 and 1 are alike (cos 0.9), the others orthogonal: only items 0 and 1 have a
    # hard negative, and each has exactly one such segment (F frames of it per frame).
    batch, frames, tau = 4, 3, 0.1
    a = one_hot_views(batch, frames)
    a[1] = 0.9 * a[0] + math.sqrt(1 - 0.81) * a[1]
    out = info_nce(a, a.clone(), temperature=tau, pooling=pooling, center=False)
    per_segment = frames if pooling == 'frame' else 1
    candidates = 1 + (batch - 1) * per_segment  # same-segment frames are not candidates
    hard = math.log(math.exp(1 / tau) + per_segment * math.exp(0.9 / tau)
                    + (batch - 2) * per_segment) - 1 / tau
    easy = math.log(math.exp(1 / tau) + (batch - 1) * per_segment) - 1 / tau
    expected = torch.tensor([hard, hard, easy, easy]) / math.log(candidates)
    torch.testing.assert_close(out.loss, expected)
    assert out.accuracy.item() == 1.0


def test_infonce_same_segment_frames_are_negatives_only_on_request():
    a = one_hot_views(batch=3, frames=4)  # constant in time: same-segment frames tie
    assert info_nce(a, a.clone()).loss.max() < 1e-3
    with_them = info_nce(a, a.clone(), same_segment_negatives=True)
    # 4 tied frames out of 3 * 4 candidates, the orthogonal ones negligible at tau 0.1.
    torch.testing.assert_close(with_them.loss, torch.full((3,), math.log(4) / math.log(12)),
                               atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="at least one negative"):
        info_nce(a[:1], a[:1].clone())


def test_infonce_is_scale_free_and_float32():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8, 5), torch.randn(4, 8, 5)
    reference = info_nce(a, b).loss
    for scale in (1e-4, 1e3):  # codebook 2 can start at an RMS of ~2e-4
        torch.testing.assert_close(info_nce(scale * a, scale * b).loss, reference)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = info_nce(a.bfloat16(), b.bfloat16()).loss
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference, atol=0.03, rtol=0)


def test_pairwise_loss_infonce_outputs_and_gradient():
    torch.manual_seed(0)
    views = random_views(2, requires_grad=True)
    loss = PairwiseLoss(sim_kind='infonce', sim_weight=2.0, div_kind='cos_hinge',
                        temperature=0.2, nce_pooling='mean')
    out = loss.embedding_terms(views, step=0)
    assert {'l_sim', 'l_div', 'sim', 'div', 'nce_accuracy', 'div_cosine'} <= set(out)
    expected = info_nce(views[0][0], views[1][0], temperature=0.2, pooling='mean')
    torch.testing.assert_close(out['sim'], expected.loss.mean())
    torch.testing.assert_close(out['l_sim'], 2.0 * expected.loss.mean())
    torch.testing.assert_close(out['nce_accuracy'], expected.accuracy)
    out['l_sim'].backward()
    assert views[0][0].grad.abs().sum() > 0 and views[1][0].grad.abs().sum() > 0
    assert views[0][1].grad is None  # InfoNCE is on the content codebook only


def test_nce_projection_is_a_parameter():
    loss = PairwiseLoss(sim_kind='infonce', nce_projection=3, dimension=4)
    assert [p.shape for p in loss.parameters()] == [torch.Size([3, 4])]
    loss.embedding_terms(random_views(2, dim=4), step=0)['l_sim'].backward()
    assert loss.projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dimension"):
        PairwiseLoss(sim_kind='infonce', nce_projection=3)


# ----------------------------------------------------------------------------- diversity

def test_cos_hinge_is_bounded_scale_free_and_zero_when_apart():
    # A large common component (as codebook vectors have) plus zero-mean per-channel parts.
    common = 5.0 * torch.ones(1, 4, 1)
    u = torch.tensor([1., 0., 0., 0.]).view(1, 4, 1) * torch.tensor([1., -1.]).view(2, 1, 1)
    v = torch.tensor([0., 1., 0., 0.]).view(1, 4, 1) * torch.tensor([1., -1.]).view(2, 1, 1)
    a, b_orthogonal, b_opposite = common + u, common + v, common - u
    for scale in (1e-4, 1.0, 1e3):
        assert diversity_loss(scale * a, scale * b_orthogonal, 'cos_hinge').item() == 0.0
        assert diversity_loss(scale * a, scale * b_opposite, 'cos_hinge').item() == 0.0
        assert diversity_loss(scale * a, scale * a, 'cos_hinge').item() == pytest.approx(1.0)
        assert diversity_loss(scale * a, scale * a, 'cos_hinge',
                              max_cosine=0.5).item() == pytest.approx(0.5)
    torch.manual_seed(0)
    for _ in range(5):  # bounded: never below 0 nor above 1 - max_cosine
        x, y = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
        value = diversity_loss(x, y, 'cos_hinge', max_cosine=-0.5, reduction='none')
        assert (value >= 0).all() and (value <= 1.5 + 1e-6).all()
    # Satisfied: zero gradient, so it stops pushing once the channels differ enough.
    a = a.clone().requires_grad_()
    diversity_loss(a, b_orthogonal, 'cos_hinge').backward()
    assert a.grad.abs().max() == 0


def test_centred_cosine_ignores_the_common_component():
    torch.manual_seed(0)
    x, y = torch.randn(4, 8, 5), torch.randn(4, 8, 5)
    offset = 100 * torch.randn(1, 8, 1)
    torch.testing.assert_close(centred_cosine(x + offset, y + offset), centred_cosine(x, y),
                               atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- cross-reconstruction

def coded_views(batch: int, num_views: int, n_q: int, requires_grad: bool = False):
    """Embeddings whose value names their origin: item b, view v, codebook k holds
    1000 * b + (v + 1) * 10 ** k in every entry."""
    return [[torch.full((batch, 2, 3), float((v + 1) * 10 ** k))
             .add(1000 * torch.arange(batch).view(-1, 1, 1)).requires_grad_(requires_grad)
             for k in range(n_q)] for v in range(num_views)]


@pytest.mark.parametrize("content_codebook", [0, 1])
def test_swap_latents_take_the_right_codebooks_of_the_right_views(content_codebook):
    batch, num_views, n_q = 2, 3, 3
    views = coded_views(batch, num_views, n_q)
    swap = swap_latents(views, content_codebook)
    pairs = list(itertools.permutations(range(num_views), 2))
    assert swap.pairs == pairs and swap.latents.shape == (batch * len(pairs), 2, 3)
    for b in range(batch):
        for p, (i, j) in enumerate(pairs):
            row = b * len(pairs) + p
            # Codebook values: 1000 b per codebook summed (n_q of them), plus the origins.
            expected = n_q * 1000 * b + (i + 1) * 10 ** content_codebook + sum(
                (j + 1) * 10 ** k for k in range(n_q) if k != content_codebook)
            assert swap.latents[row].unique().tolist() == [expected]
            assert swap.content_index[row].item() == b * num_views + i
            assert swap.target_index[row].item() == b * num_views + j
    # The indices address the flattened generator batch: x[target_index] is x_B.
    wavs = torch.arange(batch * num_views).float().view(batch, num_views, 1, 1).expand(-1, -1, 1, 5)
    targets = wavs.flatten(0, 1)[swap.target_index]
    assert targets[:, 0, 0].tolist() == [b * num_views + j for b in range(batch) for _, j in pairs]


def test_swap_latents_gradient_reaches_both_views():
    views = coded_views(batch=2, num_views=2, n_q=2, requires_grad=True)
    swap = swap_latents(views, content_codebook=0)
    pair = swap.pairs.index((0, 1))  # codebook 1 of view 0 + codebook 2 of view 1 -> x_1
    swap.latents.unflatten(0, (2, -1))[:, pair].sum().backward()
    assert views[0][0].grad.abs().min() > 0 and views[1][1].grad.abs().min() > 0
    for unused in (views[0][1], views[1][0]):  # neither the content of B nor the rest of A
        assert unused.grad is None or unused.grad.abs().max() == 0


def test_xrec_loss_is_weighted_and_scheduled():
    loss = PairwiseLoss(xrec_weight=0.5, start_step=10, schedule='linear', ramp_steps=10)
    assert loss.uses('l_xrec') and not PairwiseLoss().uses('l_xrec')
    xrec = torch.tensor([1.0, 3.0]).mean()  # the mean of the decoded swaps' losses
    terms = {'l_xrec': xrec}, {'xrec': xrec}
    assert scheduled(loss, terms, step=5)['l_xrec'].item() == 0.0
    out = scheduled(loss, terms, step=15)
    assert out['l_xrec'].item() == pytest.approx(0.5 * 0.5 * 2.0)
    assert out['xrec'].item() == pytest.approx(2.0)


def test_invariance_loss_contrasts_the_content_codebook_with_its_changed_copy():
    loss = PairwiseLoss(sim_kind='infonce', invariance_weight=0.5, start_step=10,
                        schedule='linear', ramp_steps=10, temperature=0.2)
    assert loss.uses('l_inv') and not PairwiseLoss().uses('l_inv')
    torch.manual_seed(0)
    view, changed = random_views(2, batch=4, frames=3, requires_grad=True)
    out = scheduled(loss, loss.invariance_terms(view, changed), step=15)
    want = info_nce(view[0], changed[0], temperature=0.2).loss.mean()
    assert out['inv'].item() == pytest.approx(want.item())
    assert out['l_inv'].item() == pytest.approx(0.5 * 0.5 * want.item())
    assert scheduled(loss, loss.invariance_terms(view, changed), step=5)['l_inv'].item() == 0.0
    out['l_inv'].backward()
    assert view[0].grad.abs().sum() > 0 and view[1].grad is None  # codebook 1 only
    # A changed copy that codes exactly alike reaches the minimum; a collapsed one, chance.
    same = one_hot_views(batch=4, frames=3)
    assert loss.invariance_terms([same, same], [same.clone(), same])[1]['inv'] < 0.01
    collapsed = torch.randn(1, 8, 1).expand(4, -1, 3)
    assert loss.invariance_terms([collapsed, same], [collapsed.clone(), same])[1]['inv'] \
        == pytest.approx(1.0)
    assert "pairwise.invariance" in config_error("pairwise.invariance.weight=-1.0")


CODES = torch.tensor([[0., 0.], [2., 0.], [0., 2.]])


def test_code_consensus_is_the_normalised_margin_to_the_pairs_code():
    # Frame 0: both views on code 0 (agree). Frame 1: a on code 1, b at (0.9, 0), whose own
    # code is 0; their mean (1.45, 0) is nearest code 1, so b pays
    # (|b - e1|^2 - |b - e0|^2) / |e0 - e1|^2 = (1.21 - 0.81) / 4 = 0.1 and a pays nothing.
    a = torch.tensor([[[0., 2.], [0., 0.]]], requires_grad=True)
    b = torch.tensor([[[0., 0.9], [0., 0.]]], requires_grad=True)
    out = code_consensus(a, b, CODES)
    assert out.loss.item() == pytest.approx((0 + 0.1) / 2 / 2)
    assert out.agreement.item() == 0.5
    out.loss.sum().backward()
    assert a.grad.abs().sum() == 0  # a already takes the pair's code
    assert b.grad[0, 0, 1] < 0 and b.grad[0, 1, 1] == 0  # descent moves b toward code 1
    # Scale-free: the same geometry 100x larger costs the same; a view on its own code
    # (the far side of the boundary) costs 1.
    big = code_consensus(100 * a.detach(), 100 * b.detach(), 100 * CODES)
    assert big.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    on_code = torch.tensor([[[0.], [0.]]])  # on code 0; with (2.5, 0) the pair's code is 1
    far = torch.tensor([[[2.5], [0.]]])
    assert code_consensus(on_code, far, CODES).loss.item() == pytest.approx((1.0 + 0.0) / 2)


def test_consensus_loss_is_weighted_scheduled_and_zero_for_views_coded_alike():
    loss = PairwiseLoss(consensus_weight=2.0, start_step=10, schedule='linear', ramp_steps=10)
    assert loss.uses('l_consensus') and not PairwiseLoss().uses('l_consensus')
    a = torch.tensor([[[0., 2.], [0., 0.]]])
    b = torch.tensor([[[0., 0.9], [0., 0.]]])
    out = scheduled(loss, loss.code_consensus_terms([a, b], CODES), step=15)
    assert out['consensus'].item() == pytest.approx(0.025)
    assert out['l_consensus'].item() == pytest.approx(0.5 * 2.0 * 0.025)
    assert scheduled(loss, loss.code_consensus_terms([a, b], CODES), step=5)['l_consensus'] == 0
    alike = scheduled(loss, loss.code_consensus_terms([a, a + 0.1], CODES), step=20)
    assert alike['consensus'].item() == 0.0 and alike['consensus_agreement'].item() == 1.0
    assert "consensus_weight" in config_error("pairwise.consensus_weight=-1.0")


# ----------------------------------------------------------------------------- level differences

def test_gradient_reversal_twin_opposes_the_plain_head():
    torch.manual_seed(0)
    loss = PairwiseLoss(ild_head=True, ild_weight=1.0, ild_adv_weight=1.0, ild_reversal=1.0,
                        dimension=4, ild_bands=3, ild_hidden=8)
    loss.ild_twin.load_state_dict(loss.ild_head.state_dict())
    base = torch.randn(2, 2, 4, 5)
    # Codebook 1 and codebook 2 hold the same values: the heads see the same input.
    views = [[base[v].clone().requires_grad_(), base[v].clone().requires_grad_()]
             for v in range(2)]
    targets = torch.randn(2, 3)
    out = loss.embedding_terms(views, step=0, ild_targets=targets)
    torch.testing.assert_close(out['ild'], out['ild_adv'])
    (out['l_ild'] + out['l_ild_adv']).backward()
    for v in range(2):
        assert views[v][1].grad.abs().sum() > 0
        torch.testing.assert_close(views[v][0].grad, -views[v][1].grad)
    # The twin itself learns to predict, like the head: same-sign parameter gradients.
    for p_head, p_twin in zip(loss.ild_head.parameters(), loss.ild_twin.parameters()):
        torch.testing.assert_close(p_twin.grad, p_head.grad)
    x = torch.randn(3, requires_grad=True)
    reverse_gradient(x, 0.25).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), -0.25))


def test_level_difference_head_learns_and_is_antisymmetric():
    torch.manual_seed(0)
    batch, dim, n_bands = 16, 8, 4
    head = LevelDifferenceHead(dim, n_bands, hidden=32)
    a, b = torch.randn(batch, dim, 5), torch.randn(batch, dim, 5)
    torch.testing.assert_close(head(a, b), -head(b, a))
    torch.testing.assert_close(head(a, a), torch.zeros(batch, n_bands))
    # Codebook 2's time mean carries each channel's level (scaled far down, as at init).
    levels = 3 * torch.randn(batch, 2, n_bands)
    mix = torch.randn(n_bands, dim)
    views = [1e-4 * ((levels[:, v] @ mix).unsqueeze(-1) + 0.1 * torch.randn(batch, dim, 5))
             for v in range(2)]
    target = levels[:, 0] - levels[:, 1]
    assert level_difference_loss(torch.zeros_like(target), target).item() == pytest.approx(1.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=2e-2)
    for _ in range(100):
        error = level_difference_loss(head(*views), target)
        optimizer.zero_grad()
        error.backward()
        optimizer.step()
    assert error.item() < 0.1


def test_ild_targets_shapes_and_missing_targets():
    torch.manual_seed(0)
    loss = PairwiseLoss(ild_head=True, dimension=4, ild_bands=3, ild_hidden=8)
    views = random_views(3, dim=4)
    levels = torch.randn(3, 3, 3)  # per-view levels [B, V, n_bands]
    out = loss.embedding_terms(views, step=0, ild_targets=levels)
    pairs = list(itertools.combinations(range(3), 2))
    expected = torch.stack([level_difference_loss(
        loss.ild_head(views[i][1], views[j][1]), levels[:, i] - levels[:, j]) for i, j in pairs])
    torch.testing.assert_close(out['ild'], expected.mean())
    torch.testing.assert_close(out['l_ild'], 0.3 * expected.mean())
    two = random_views(2, dim=4)
    difference = torch.randn(3, 3)
    expected = level_difference_loss(loss.ild_head(two[0][1], two[1][1]), difference)
    torch.testing.assert_close(loss.embedding_terms(two, step=0, ild_targets=difference)['ild'],
                               expected)
    with pytest.raises(ValueError, match="ild_targets"):
        loss.embedding_terms(views, step=0)  # training without targets
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        loss.embedding_terms(views, step=0,
                             ild_targets=torch.randn(3, 3))  # a difference for 3 views
    with torch.no_grad():
        assert 'l_ild' not in loss.embedding_terms(views, step=0)  # validation


def test_cue_loss_is_zero_for_kept_differences_and_one_for_none():
    loss = PairwiseLoss(cue_weight=2.0)
    torch.manual_seed(0)
    inputs = torch.randn(6, 2, 8) * 3.0  # per-view band levels, dB
    kept = inputs + 40.0  # the decode at another overall level keeps every difference
    assert loss.cue_fidelity(kept, inputs)[1]['cue'].item() == pytest.approx(0.0, abs=1e-6)
    none = inputs[:, :1].expand(-1, 2, -1)  # both decoded views alike
    result = scheduled(loss, loss.cue_fidelity(none, inputs), step=0)
    assert result['cue'].item() == pytest.approx(1.0, rel=1e-5)
    assert result['l_cue'].item() == pytest.approx(2.0, rel=1e-5)
    halved = inputs.clone()
    halved[:, 1] = (inputs[:, 0] + inputs[:, 1]) / 2  # half of each difference kept
    assert loss.cue_fidelity(halved, inputs)[1]['cue'].item() == pytest.approx(0.25, rel=1e-5)
    late = PairwiseLoss(cue_weight=1.0, start_step=5)
    assert scheduled(late, late.cue_fidelity(none, inputs), step=4)['l_cue'] == 0


def test_cue_shape_scores_the_spectral_shape_of_the_differences_and_not_their_broadband_part():
    torch.manual_seed(0)
    inputs = torch.randn(6, 2, 8) * 3.0
    shape = PairwiseLoss(cue_weight=1.0, cue_shape=True)
    full = PairwiseLoss(cue_weight=1.0)
    # The decode keeps each band's difference up to a broadband offset per item: the shape is
    # exact, the full difference is not.
    shifted = inputs.clone()
    shifted[:, 1] += torch.randn(6, 1) * 4.0
    assert shape.cue_fidelity(shifted, inputs)[1]['cue'].item() == pytest.approx(0.0, abs=1e-6)
    assert full.cue_fidelity(shifted, inputs)[1]['cue'].item() > 0.5
    # The decode keeps only each difference's broadband part: no shape at all.
    broadband = inputs.clone()
    broadband[:, 1] = inputs[:, 0] - (inputs[:, 0] - inputs[:, 1]).mean(-1, keepdim=True)
    assert shape.cue_fidelity(broadband, inputs)[1]['cue'].item() == pytest.approx(1.0, rel=1e-5)
    assert full.cue_fidelity(broadband, inputs)[1]['cue'].item() < 1.0


# ----------------------------------------------------------------------------- schedule

def test_start_step_switches_every_term_on_then_ramps():
    torch.manual_seed(0)
    views = random_views(2, dim=4)
    targets = torch.randn(3, 8)
    full = PairwiseLoss(ild_head=True, dimension=4)
    late = PairwiseLoss(ild_head=True, dimension=4, start_step=100, schedule='linear',
                        ramp_steps=10)
    late.load_state_dict(full.state_dict())
    reference = full.embedding_terms(views, step=0, ild_targets=targets)
    assert not late.is_active(50) and not late.is_active(100) and late.is_active(101)
    early = late.embedding_terms(views, step=50, ild_targets=targets)
    assert all(early[k].item() == 0.0 for k in ('l_sim', 'l_div', 'l_ild', 'l_ild_adv'))
    torch.testing.assert_close(early['sim'], reference['sim'])  # logging is unscheduled
    half = late.embedding_terms(views, step=105, ild_targets=targets)
    for k in ('l_sim', 'l_div', 'l_ild', 'l_ild_adv'):
        torch.testing.assert_close(half[k], 0.5 * reference[k])
    torch.testing.assert_close(late.embedding_terms(views, step=110, ild_targets=targets)['l_sim'],
                               reference['l_sim'])
    assert "pairwise.start_step" in config_error("pairwise.start_step=-1")
