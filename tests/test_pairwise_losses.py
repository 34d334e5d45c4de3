"""Pairwise similarity / diversity losses, K-view averaging, PairwiseLoss options."""
from __future__ import annotations

import itertools

import pytest
import torch
from omegaconf import open_dict

from pairwise_losses import (PairwiseLoss, diversity_loss, pairwise_losses, similarity_loss,
                             split_views)

# One item, D = 2, F = 2. Frames of a: (1, 0), (0, 1); frames of b: (0, 1), (0, 2).
A = torch.tensor([[[1., 0.], [0., 1.]]])
B = torch.tensor([[[0., 0.], [1., 2.]]])
# mse: differences (1, -1), (0, -1) -> (1 + 1 + 0 + 1) / 4 = 0.75
# cosine per frame: 0 and 1 -> mean 0.5


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


def test_k_views_average_all_pairs():
    torch.manual_seed(0)
    views = random_views(3)
    out = pairwise_losses(*views, sim_weight=1.0, div_weight=1.0, div_kind='margin', margin=3.0)
    pairs = list(itertools.combinations(views, 2))
    assert len(pairs) == 3
    sims = [pairwise_losses(u, v, sim_weight=1.0, div_weight=1.0, div_kind='margin',
                            margin=3.0) for u, v in pairs]
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
    flat = [torch.arange(batch * views, dtype=torch.float32).view(-1, 1, 1).expand(-1, 4, 5) + 100 * k
            for k in range(n_q)]
    split = split_views(flat, views)
    assert len(split) == views and all(len(view) == n_q for view in split)
    for v in range(views):
        for k in range(n_q):
            assert split[v][k].shape == (batch, 4, 5)
            assert split[v][k][:, 0, 0].tolist() == [b * views + v + 100 * k for b in range(batch)]
    with pytest.raises(ValueError, match="datasets.views"):
        split_views(flat, 4)


# ----------------------------------------------------------------------------- PairwiseLoss

def test_from_config_defaults(cfg_factory):
    cfg = cfg_factory("config_paired_nq2")
    loss = PairwiseLoss.from_config(cfg.pairwise, dimension=cfg.model.dimension)
    assert (loss.sim_weight, loss.div_weight, loss.sim_kind, loss.div_kind) == (0.5, 0.5, 'mse',
                                                                                 'neg_mse')
    assert loss.classifier is None and list(loss.parameters()) == []
    torch.manual_seed(0)
    views = random_views(2, requires_grad=True)
    out = loss(views, step=0)
    assert set(out) == {'l_sim', 'l_div', 'sim', 'div'}
    reference = pairwise_losses(*views)
    torch.testing.assert_close(out['l_sim'], reference['l_sim'])
    torch.testing.assert_close(out['l_div'], reference['l_div'])
    torch.testing.assert_close(out['sim'], 2 * reference['l_sim'].detach())
    assert not out['sim'].requires_grad and not out['div'].requires_grad
    assert out['l_sim'].requires_grad and out['l_div'].requires_grad


def test_class_weights_scale_per_item_similarity():
    torch.manual_seed(0)
    views = random_views(2, batch=3)
    loss = PairwiseLoss(sim_weight=1.0, class_weights={'Beach': 3.0, 'Park': 0.0})
    per_item = similarity_loss(views[0][0], views[1][0], reduction='none')
    out = loss(views, step=0, classes=['Beach', 'Park', 'Woodland'])  # Woodland: unknown -> 1
    expected = torch.stack([3.0 * per_item[0], 0.0 * per_item[1], per_item[2]]).mean()
    torch.testing.assert_close(out['l_sim'], expected)
    torch.testing.assert_close(out['sim'], per_item.mean())  # logged value stays unweighted
    unweighted = loss(views, step=0)
    torch.testing.assert_close(unweighted['l_sim'], per_item.mean())


def test_linear_schedule_ramps():
    torch.manual_seed(0)
    views = random_views(2)
    full = PairwiseLoss()(views, step=0)
    ramp = PairwiseLoss(schedule='linear', ramp_steps=10)
    assert ramp(views, step=0)['l_sim'].item() == 0.0
    torch.testing.assert_close(ramp(views, step=5)['l_sim'], 0.5 * full['l_sim'])
    torch.testing.assert_close(ramp(views, step=5)['l_div'], 0.5 * full['l_div'])
    torch.testing.assert_close(ramp(views, step=10)['l_div'], full['l_div'])
    torch.testing.assert_close(ramp(views, step=1000)['l_sim'], full['l_sim'])
    torch.testing.assert_close(ramp(views, step=5)['sim'], full['sim'])  # logging unscaled
    with pytest.raises(ValueError, match="pairwise.ramp_steps"):
        PairwiseLoss(schedule='linear', ramp_steps=0)
    with pytest.raises(ValueError, match="pairwise.schedule"):
        PairwiseLoss(schedule='cosine')
    with pytest.raises(ValueError, match="must differ"):
        PairwiseLoss(content_codebook=1, channel_codebook=1)
    with pytest.raises(ValueError, match="pairwise.margin"):
        PairwiseLoss(div_kind='margin', margin=0.0)


def test_channel_classifier_learns_separable_channels(cfg_factory):
    cfg = cfg_factory("config_paired_nq2")
    with open_dict(cfg):
        cfg.pairwise.channel_classifier.enabled = True
        cfg.pairwise.channel_classifier.num_channels = 4
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
        out = loss(views, step=0, channels=channels)
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
        loss(views, step=0)
    with pytest.raises(ValueError, match="num_channels=4"):
        loss(views, step=0, channels=torch.tensor([[0, 1], [2, 7], [1, 0]]))
