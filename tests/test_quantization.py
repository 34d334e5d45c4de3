"""Residual vector quantizer: EMA codebook updates, k-means init, dead codes, gradients of every
codebook, and codebook synchronisation across 2 gloo processes."""
from __future__ import annotations

import io
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from utils import distributed
from modules import quantization
from modules.quantization import EuclideanCodebook, ResidualVectorQuantizer, kmeans

DIM, BINS = 4, 8


def inited_codebook(threshold: float = 0.0, seed: int = 0) -> EuclideanCodebook:
    """A codebook already initialised with well-separated codes and healthy counts."""
    torch.manual_seed(seed)
    codebook = EuclideanCodebook(DIM, BINS, kmeans_init=True, kmeans_iters=2,
                                 threshold_ema_dead_code=threshold)
    embed = torch.randn(BINS, DIM) * 3
    codebook.embed.copy_(embed)
    codebook.cluster_size.fill_(5.0)
    codebook.embed_avg.copy_(embed * 5.0)
    codebook.inited.fill_(1.0)
    return codebook


def inited_rvq(n_q: int = 2, dim: int = DIM, bins: int = BINS) -> ResidualVectorQuantizer:
    rvq = ResidualVectorQuantizer(dimension=dim, n_q=n_q, bins=bins, kmeans_iters=2,
                                  threshold_ema_dead_code=0)
    for codebook in rvq.codebooks:
        codebook.embed.normal_()
        codebook.embed_avg.copy_(codebook.embed)
        codebook.cluster_size.fill_(1.0)
        codebook.inited.fill_(1.0)
    return rvq


def expected_ema(codebook: EuclideanCodebook, x: torch.Tensor, codes: torch.Tensor):
    """EMA update written out from its definition (decay, Laplace smoothing)."""
    decay, eps = codebook.decay, codebook.epsilon
    onehot = F.one_hot(codes, BINS).float()
    cluster_size = decay * codebook.cluster_size + (1 - decay) * onehot.sum(0)
    embed_avg = decay * codebook.embed_avg + (1 - decay) * onehot.t() @ x
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + BINS * eps) * total
    return cluster_size, embed_avg, embed_avg / smoothed[:, None]


def test_ema_update_matches_definition_and_eval_never_updates():
    codebook = inited_codebook()
    x = torch.randn(30, DIM) * 3
    before = [b.clone() for b in (codebook.cluster_size, codebook.embed_avg, codebook.embed)]
    codebook.eval()
    vectors, codes = codebook(x)
    for old, new in zip(before, (codebook.cluster_size, codebook.embed_avg, codebook.embed)):
        assert torch.equal(old, new)
    assert torch.equal(vectors, before[2][codes])
    distances = torch.cdist(x, before[2])
    assert torch.equal(codes, distances.argmin(dim=1))

    codebook.train()
    want = expected_ema(codebook, x, codes)
    vectors_train, codes_train = codebook(x)
    assert torch.equal(codes_train, codes)
    assert torch.equal(vectors_train, vectors), "returns the vectors used, before the update"
    for got, exp in zip((codebook.cluster_size, codebook.embed_avg, codebook.embed), want):
        torch.testing.assert_close(got, exp)


def test_kmeans_buffer_0_initialises_on_the_first_training_batch():
    torch.manual_seed(0)
    centres = torch.randn(BINS, DIM) * 10
    x = (centres.repeat(20, 1) + 0.01 * torch.randn(20 * BINS, DIM))
    codebook = EuclideanCodebook(DIM, BINS, kmeans_iters=10, threshold_ema_dead_code=0,
                                 kmeans_buffer=0)
    codebook.eval()
    codebook(x)
    assert codebook.inited.item() == 0 and codebook.embed.abs().sum() == 0, "eval must not init"
    codebook.train()
    codebook(x)
    assert codebook.inited.item() == 1
    # k-means converged: each used code is the centroid of the points it quantizes (which also
    # fails if the first EMA step after init shrinks the codes).
    assignment = torch.cdist(x, codebook.embed).argmin(dim=1)
    for k in assignment.unique():
        torch.testing.assert_close(codebook.embed[k], x[assignment == k].mean(0),
                                   atol=1e-3, rtol=1e-3)
    embed = codebook.embed.clone()
    codebook(x + 100.0)  # a second batch only makes an EMA step, no re-init
    assert (codebook.embed - embed).norm(dim=1).max() < 50.0


def test_random_init_without_kmeans_stays_bounded_after_first_update():
    torch.manual_seed(0)
    codebook = EuclideanCodebook(DIM, BINS, kmeans_init=False, threshold_ema_dead_code=0)
    assert codebook.inited.item() == 1
    before = codebook.embed.abs().max()
    codebook(torch.randn(5, DIM))  # most codes unused in this batch
    assert codebook.embed.abs().max() < 10 * before


def test_kmeans_returns_cluster_sizes_of_last_assignment():
    torch.manual_seed(0)
    samples = torch.cat([torch.zeros(6, 2), torch.full((4, 2), 5.0)])
    means, counts = kmeans(samples, 2, num_iters=3)
    assert sorted(counts.tolist()) == [4.0, 6.0]
    assert sorted(means[:, 0].tolist()) == [0.0, 5.0]


def test_dead_code_is_replaced_by_a_batch_vector_and_survives_the_ema_update():
    codebook = inited_codebook(threshold=2.0)
    dead = 3
    codebook.embed[dead] = 1e3  # never chosen
    codebook.embed_avg[dead] = 0.0
    codebook.cluster_size[dead] = 0.0
    x = torch.randn(40, DIM)
    ema_only = expected_ema(codebook, x, codebook.encode(x))[2]
    _, codes = codebook(x)
    assert (codes != dead).all()
    distance_to_batch = torch.cdist(codebook.embed[dead:dead + 1], x).min()
    assert distance_to_batch < 1e-3, "the replacement must not be undone by the EMA update"
    assert codebook.cluster_size[dead] >= 0.99 * 2 * codebook.dead_count
    # Codes with healthy counts are not replaced: they only take their EMA step (up to the
    # Laplace smoothing's share of the replaced code's new count).
    healthy = torch.arange(BINS) != dead
    torch.testing.assert_close(codebook.embed[healthy], ema_only[healthy], rtol=1e-3, atol=1e-3)


def test_small_batches_do_not_count_the_whole_codebook_as_dead():
    """About one use per code per step (batch 8 x 1 s for 1024 codes) is a healthy codebook:
    with EnCodec's raw comparison against 2 nearly every code would be re-drawn each step."""
    codebook = inited_codebook(threshold=2.0)
    codebook.cluster_size.fill_(0.5)
    before = codebook.embed.clone()
    x = codebook.embed[torch.arange(40) % BINS] + 0.01 * torch.randn(40, DIM)
    codebook(x)
    unused = torch.ones(BINS, dtype=torch.bool)
    unused[torch.arange(40) % BINS] = False
    # Unused codes keep their vector (only the EMA rescales it by the smoothing): no re-draw.
    assert torch.allclose(codebook.embed[unused], before[unused], rtol=1e-3, atol=1e-4)


def test_a_code_unused_for_longer_than_the_horizon_is_replaced():
    codebook = inited_codebook(threshold=2.0)
    dead = 3
    codebook.embed[dead] = 1e3  # never chosen
    codebook.cluster_size[dead] = 0.5
    codebook.embed_avg[dead] = 0.5 * codebook.embed[dead]
    x = torch.randn(40, DIM)
    steps = 0
    while float(torch.cdist(codebook.embed[dead:dead + 1], x).min()) > 1e-3 and steps < 1000:
        codebook(x)
        steps += 1
    # 0.5 * 0.99^n < 2 * (1 - 0.99)  <=>  n > log(0.04) / log(0.99) ~ 320 steps
    assert 300 < steps < 340


def test_every_codebook_embedding_has_straight_through_gradient_to_input():
    torch.manual_seed(0)
    rvq = inited_rvq(n_q=3)
    for training in (True, False):
        rvq.train(training)
        x = torch.randn(2, DIM, 5, requires_grad=True)
        out = rvq(x, return_embeddings=True)
        assert len(out.embeddings) == 3
        for k, embedding in enumerate(out.embeddings):
            weight = torch.randn_like(embedding)
            (grad,) = torch.autograd.grad((embedding * weight).sum(), x, retain_graph=True)
            torch.testing.assert_close(grad, weight, msg=f"codebook {k}")
        (grad,) = torch.autograd.grad((out.quantized * 2).sum(), x, retain_graph=True)
        torch.testing.assert_close(grad, torch.full_like(x, 2.0))


def test_embeddings_equal_chosen_vectors_and_quantized_is_their_sum():
    torch.manual_seed(0)
    rvq = inited_rvq(n_q=2)
    rvq.train()
    embeds = [cb.embed.clone() for cb in rvq.codebooks]  # before this step's EMA update
    x = torch.randn(3, DIM, 7)
    out = rvq(x, return_embeddings=True)
    chosen = [F.embedding(out.codes[:, k], embeds[k]).transpose(1, 2) for k in range(2)]
    for embedding, vectors in zip(out.embeddings, chosen):
        torch.testing.assert_close(embedding, vectors)
    torch.testing.assert_close(out.quantized, chosen[0] + chosen[1])
    # Codebook 2 quantizes what codebook 1 left.
    residual = (x - chosen[0]).transpose(1, 2).reshape(-1, DIM)
    assert torch.equal(out.codes[:, 1].reshape(-1),
                       torch.cdist(residual, embeds[1]).argmin(dim=1))


def test_embeddings_of_an_extra_view_are_the_forwards_without_updating_the_codebooks():
    torch.manual_seed(0)
    rvq = inited_rvq(n_q=3).train()
    before = {name: tensor.clone() for name, tensor in rvq.state_dict().items()}
    x = torch.randn(2, DIM, 5, requires_grad=True)
    embeddings = rvq.embeddings(x)
    for name, tensor in rvq.state_dict().items():  # no EMA, no dead-code or k-means step
        assert torch.equal(tensor, before[name]), name
    want = rvq.eval()(x, return_embeddings=True).embeddings
    for k, (got, expected) in enumerate(zip(embeddings, want)):
        torch.testing.assert_close(got, expected, msg=f"codebook {k}")
        weight = torch.randn_like(got)
        (grad,) = torch.autograd.grad((got * weight).sum(), x, retain_graph=True)
        torch.testing.assert_close(grad, weight, msg=f"codebook {k}: straight-through")


def split_rvq(content_dims: int = 2, dim: int = DIM, n_q: int = 2) -> ResidualVectorQuantizer:
    rvq = ResidualVectorQuantizer(dimension=dim, n_q=n_q, bins=BINS, kmeans_iters=2,
                                  threshold_ema_dead_code=0, kmeans_buffer=0,
                                  content_dims=content_dims)
    rvq.train()(torch.randn(4, dim, 6))  # k-means on the first batch
    return rvq


def test_a_split_quantizer_codes_the_content_dims_in_codebook_1_and_the_rest_in_codebook_2():
    torch.manual_seed(0)
    rvq = split_rvq(content_dims=2)
    for _ in range(3):  # EMA steps: the codes stay in their dimensions
        rvq(torch.randn(4, DIM, 6))
    first, second = rvq.codebooks
    assert first.embed[:, 2:].abs().max() == 0 and second.embed[:, :2].abs().max() == 0
    rvq.eval()
    x = torch.randn(3, DIM, 5)
    channel_changed, content_changed = x.clone(), x.clone()
    channel_changed[:, 2:] += 5 * torch.randn(3, DIM - 2, 5)
    content_changed[:, :2] += 5 * torch.randn(3, 2, 5)
    codes = rvq.encode(x)
    # What codebook 2 codes cannot move codebook 1's choice, and the converse.
    assert torch.equal(rvq.encode(channel_changed)[:, 0], codes[:, 0])
    assert torch.equal(rvq.encode(content_changed)[:, 1], codes[:, 1])
    assert not torch.equal(rvq.encode(channel_changed)[:, 1], codes[:, 1])
    out = rvq(x, return_embeddings=True)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(rvq.decode(codes), out.quantized)
    # Each embedding carries the gradient of its own dimensions only.
    x.requires_grad_(True)
    out = rvq(x, return_embeddings=True)
    for k, own in enumerate((slice(0, 2), slice(2, DIM))):
        (grad,) = torch.autograd.grad(out.embeddings[k].sum(), x, retain_graph=True)
        assert (grad[:, own] == 1).all() and grad.sum() == grad[:, own].numel()
    with pytest.raises(ValueError, match="content_dims"):
        ResidualVectorQuantizer(dimension=DIM, n_q=2, bins=BINS, content_dims=DIM)
    with pytest.raises(ValueError, match="content_dims"):
        ResidualVectorQuantizer(dimension=DIM, n_q=1, bins=BINS, content_dims=2)


def test_a_shared_content_code_is_the_views_mean_content_with_each_views_own_channel_part():
    torch.manual_seed(0)
    rvq = split_rvq(content_dims=2)
    views = 2
    x = torch.randn(3 * views, DIM, 5, requires_grad=True)  # rows b * V + v
    shared = rvq.share_content(x, views)
    grouped, original = shared.view(3, views, DIM, 5), x.detach().view(3, views, DIM, 5)
    for v in range(views):
        torch.testing.assert_close(grouped[:, v, :2], original[:, :, :2].mean(dim=1))
        torch.testing.assert_close(grouped[:, v, 2:], original[:, v, 2:])
    # Codebook 1 then codes each item once: its views cannot disagree.
    codes = rvq(shared).codes.view(3, views, 2, 5)
    assert torch.equal(codes[:, 0, 0], codes[:, 1, 0])
    # The content gradient reaches every view's encoder output, 1 / V each; the channel
    # part's only its own.
    (grad,) = torch.autograd.grad(shared[0, 0].sum() + shared[0, 2].sum(), x)
    assert grad[0, 0].eq(0.5).all() and grad[1, 0].eq(0.5).all() and grad[2:].eq(0).all()
    (grad,) = torch.autograd.grad(shared[1, 3].sum(), x)
    assert grad[1, 3].eq(1).all() and grad.sum() == grad[1, 3].numel()
    with pytest.raises(ValueError, match="split quantizer"):
        split_rvq(content_dims=0).share_content(x, views)
    with pytest.raises(ValueError, match="views"):
        rvq.share_content(x[:5], views)


def test_a_split_quantizer_reinitialises_codes_loaded_from_an_unsplit_one():
    torch.manual_seed(0)
    unsplit = inited_rvq(n_q=2)
    split = ResidualVectorQuantizer(dimension=DIM, n_q=2, bins=BINS, kmeans_iters=2,
                                    threshold_ema_dead_code=0, kmeans_buffer=0, content_dims=2)
    split.load_state_dict(unsplit.state_dict())
    assert not split.initialized and all(cb.embed.abs().max() == 0 for cb in split.codebooks)
    split.train()(torch.randn(4, DIM, 6))  # k-means again, on its own dimensions
    assert split.initialized
    again = ResidualVectorQuantizer(dimension=DIM, n_q=2, bins=BINS, content_dims=2)
    again.load_state_dict(split.state_dict())  # a split checkpoint keeps its codes
    assert again.initialized
    for mine, theirs in zip(again.codebooks, split.codebooks):
        assert torch.equal(mine.embed, theirs.embed)


def test_commit_loss_sums_codebooks_and_pulls_every_residual():
    torch.manual_seed(0)
    rvq = inited_rvq(n_q=2).eval()
    x = torch.randn(2, DIM, 4, requires_grad=True)
    out = rvq(x)
    c0 = rvq.codebooks[0].embed[out.codes[:, 0]].transpose(1, 2)
    c1 = rvq.codebooks[1].embed[out.codes[:, 1]].transpose(1, 2)
    r1 = x - c0
    expected = F.mse_loss(x, c0) + F.mse_loss(r1, c1)
    torch.testing.assert_close(out.commit_loss, expected)
    (grad,) = torch.autograd.grad(out.commit_loss, x)
    n = x.numel()
    torch.testing.assert_close(grad, 2 * (x - c0) / n + 2 * (r1 - c1) / n)


def test_encode_decode_match_forward_in_eval():
    torch.manual_seed(0)
    rvq = inited_rvq(n_q=2).eval()
    x = torch.randn(2, DIM, 6)
    out = rvq(x)
    codes = rvq.encode(x)
    assert codes.dtype == torch.long and codes.shape == (2, 2, 6)
    assert torch.equal(codes, out.codes)
    torch.testing.assert_close(rvq.decode(codes), out.quantized)
    torch.testing.assert_close(rvq.decode(codes[:, :1]),
                               rvq.codebooks[0].embed[codes[:, 0]].transpose(1, 2))
    with pytest.raises(ValueError, match="codes must be"):
        rvq.decode(codes[:, :, None])
    with pytest.raises(ValueError, match="latent"):
        rvq(torch.randn(2, DIM + 1, 6))


def test_distributed_helpers_are_noops_in_a_single_process():
    t = torch.arange(3.0)
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.all_reduce_sum_(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.broadcast_(t) is t
    assert distributed.all_gather_cat(t) is t
    distributed.barrier()


# ------------------------------------------------------------------ k-means on a buffer
@pytest.fixture
def kmeans_sizes(monkeypatch) -> list[int]:
    """The number of vectors of every k-means run, in order."""
    sizes: list[int] = []

    def recording_kmeans(samples, num_clusters, num_iters):
        sizes.append(samples.shape[0])
        return kmeans(samples, num_clusters, num_iters)

    monkeypatch.setattr(quantization, "kmeans", recording_kmeans)
    return sizes


def test_kmeans_waits_for_a_buffer_of_kmeans_buffer_x_bins_vectors(kmeans_sizes):
    torch.manual_seed(0)
    codebook = EuclideanCodebook(DIM, BINS, kmeans_iters=3, threshold_ema_dead_code=0,
                                 kmeans_buffer=2)  # 16 vectors
    batches = [torch.randn(5, DIM) for _ in range(4)]
    codebook.eval()
    codebook(batches[0])
    assert codebook.kmeans_samples.shape[0] == 0 and not codebook.has_codes, "eval never gathers"
    codebook.train()
    for step, batch in enumerate(batches[:3]):
        codebook(batch)
        assert not codebook.initialized and codebook.has_codes  # provisional codes
        assert torch.equal(codebook.kmeans_samples, torch.cat(batches[:step + 1]))
        assert codebook.kmeans_progress == pytest.approx(5 * (step + 1) / 16)
    assert kmeans_sizes == [5], "one provisional k-means, on the first batch"
    codebook(batches[3])  # 20 vectors >= 16
    assert codebook.initialized and codebook.kmeans_progress == 1.0
    assert kmeans_sizes == [5, 16], "the final k-means runs on exactly 2 x bins vectors"
    assert codebook.kmeans_samples.shape == (0, DIM), "the buffer is freed after the init"
    codebook(torch.randn(5, DIM))
    assert kmeans_sizes == [5, 16] and codebook.kmeans_samples.shape[0] == 0


def test_kmeans_buffer_memory_is_bounded(kmeans_sizes):
    torch.manual_seed(0)
    codebook = EuclideanCodebook(DIM, BINS, kmeans_iters=2, threshold_ema_dead_code=0,
                                 kmeans_buffer=3)  # 24 vectors
    codebook(torch.randn(23, DIM))
    assert codebook.kmeans_samples.shape[0] == 23 and not codebook.initialized
    codebook(torch.randn(1000, DIM))  # one huge batch: k-means on a subset of the cap
    assert codebook.initialized and kmeans_sizes == [23, 24]
    assert codebook.kmeans_samples.numel() == 0


def test_the_final_init_ignores_what_happened_to_the_provisional_codebook():
    """EMA and dead-code updates of the provisional codebook must not leak into the final init."""
    torch.manual_seed(0)
    batches = [torch.randn(6, DIM) * 2 for _ in range(3)]
    results = []
    for tamper in (False, True):
        torch.manual_seed(1)
        codebook = EuclideanCodebook(DIM, BINS, kmeans_iters=3, threshold_ema_dead_code=0,
                                     kmeans_buffer=2)
        for step, batch in enumerate(batches):
            if tamper and step == 2:  # as if many EMA / dead-code updates had moved it
                other = torch.Generator().manual_seed(2)  # leaves the k-means RNG alone
                codebook.embed.mul_(-7.0).add_(3.0)
                codebook.embed_avg.uniform_(generator=other)
                codebook.cluster_size.uniform_(0.5, 9.0, generator=other)
            codebook(batch)
        assert codebook.initialized
        results.append(buffers(codebook))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def latent_batch(seed: int, dim: int = 8, frames: int = 8) -> torch.Tensor:
    """A `[2, dim, frames]` latent at the encoder's typical RMS (~6e-2)."""
    return torch.randn(2, dim, frames, generator=torch.Generator().manual_seed(seed)) * 0.06


def test_codebook_2_initialises_on_the_residuals_of_codebook_1_final_init():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=8, n_q=2, bins=16, kmeans_iters=10,
                                  threshold_ema_dead_code=0, kmeans_buffer=4).train()
    first, second = rvq.codebooks
    step = 0
    while not first.initialized:
        assert second.kmeans_samples.shape[0] == 0, "codebook 2 waits for codebook 1"
        x = latent_batch(step)
        out = rvq(x, return_embeddings=True)
        step += 1
    assert not rvq.initialized and rvq.kmeans_progress == [1.0, 0.25]
    # It started gathering in the forward of codebook 1's final init, on the true residuals.
    residual = (x - out.embeddings[0]).transpose(1, 2).reshape(-1, 8)
    assert torch.equal(second.kmeans_samples, residual)
    while not second.initialized:
        x = latent_batch(step)
        out = rvq(x, return_embeddings=True)
        step += 1
    assert rvq.initialized and rvq.kmeans_progress == [1.0, 1.0]
    residual_rms = float((x - out.embeddings[0]).pow(2).mean().sqrt())
    codebook_2_rms = float(second.embed.pow(2).mean().sqrt())
    # On one batch of as many frames as codes, codebook 1 fits every frame and codebook 2
    # starts at ~0; k-means on real residuals gives codes of about the residual's size.
    assert residual_rms > 0.02 and codebook_2_rms > 0.5 * residual_rms


def test_the_halves_of_a_split_gather_for_k_means_together_and_a_third_codebook_waits():
    """Codebook 2 of a split codes dimensions codebook 1 never touches: its input does not
    depend on codebook 1, so it gathers from the first step; codebook 3 codes the whole
    residual and waits for both."""
    torch.manual_seed(0)
    split = ResidualVectorQuantizer(dimension=8, n_q=3, bins=16, kmeans_iters=10,
                                    threshold_ema_dead_code=0, kmeans_buffer=4,
                                    content_dims=4).train()
    split(latent_batch(0))
    assert split.kmeans_progress == [0.25, 0.25, 0.0]
    # The buffer holds exactly codebook 2's dims of the latent.
    x = latent_batch(1)
    split(x)
    gathered = split.codebooks[1].kmeans_samples[16:]
    torch.testing.assert_close(
        gathered, (x * split.codebooks[1].dims[:, None]).transpose(1, 2).reshape(-1, 8))
    step = 2
    while not split.codebooks[0].initialized:
        split(latent_batch(step))
        step += 1
    assert split.codebooks[1].initialized and not split.codebooks[2].initialized


def test_resume_mid_gather_gives_the_codebooks_of_an_uninterrupted_run():
    def make() -> ResidualVectorQuantizer:
        return ResidualVectorQuantizer(dimension=8, n_q=2, bins=16, kmeans_iters=5,
                                       threshold_ema_dead_code=2, kmeans_buffer=3).train()

    torch.manual_seed(0)
    uninterrupted = make()
    for step in range(8):
        uninterrupted(latent_batch(step))
    assert uninterrupted.initialized

    torch.manual_seed(0)
    first_half = make()
    for step in range(4):
        first_half(latent_batch(step))
    assert first_half.kmeans_progress[0] == 1.0 and 0 < first_half.kmeans_progress[1] < 1, \
        "the checkpoint is taken while codebook 2 gathers"
    saved = io.BytesIO()
    torch.save({"rvq": first_half.state_dict(), "rng": torch.get_rng_state()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed = make()
    resumed.load_state_dict(checkpoint["rvq"])
    torch.set_rng_state(checkpoint["rng"])
    for step in range(4, 8):
        resumed(latent_batch(step))
    for (name, want), (_, got) in zip(uninterrupted.state_dict().items(),
                                      resumed.state_dict().items()):
        assert torch.equal(want, got), name


def test_state_dicts_without_a_kmeans_buffer_still_load():
    """Official EnCodec checkpoints and ours from before the buffer existed."""
    rvq = inited_rvq()
    old_style = {key: value for key, value in rvq.state_dict().items()
                 if not key.endswith("kmeans_samples")}
    fresh = ResidualVectorQuantizer(dimension=DIM, n_q=2, bins=BINS)
    fresh.codebooks[0].kmeans_samples = torch.randn(5, DIM)  # stale gather, dropped
    fresh.load_state_dict(old_style)
    assert fresh.initialized
    assert all(cb.kmeans_samples.shape == (0, DIM) for cb in fresh.codebooks)
    with pytest.raises(RuntimeError, match="kmeans_samples"):  # wrong dimension still caught
        fresh.load_state_dict({**old_style, "vq.layers.0._codebook.kmeans_samples":
                               torch.zeros(3, DIM + 1)})


# ------------------------------------------------------------------ skipped steps
@pytest.mark.parametrize("steps_before", [0, 2, 3])  # fresh, provisional + gathering, final init
def test_restoring_a_snapshot_undoes_a_training_forward_exactly(steps_before):
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dimension=8, n_q=2, bins=16, kmeans_iters=3,
                                  threshold_ema_dead_code=2, kmeans_buffer=4).train()
    for step in range(steps_before):
        rvq(latent_batch(step))
    before = {name: value.clone() for name, value in rvq.state_dict().items()}
    snapshot = rvq.snapshot()
    rvq(latent_batch(100) * 10)  # the discarded step (e.g. the GradScaler skipped it)
    assert any(not torch.equal(before[name], value) or before[name].shape != value.shape
               for name, value in rvq.state_dict().items()), "the forward changed something"
    rvq.restore(snapshot)
    after = rvq.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


# ------------------------------------------------------------------ mixed precision
def test_quantizer_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    dim, bins = 128, 1024
    rvq = inited_rvq(n_q=2, dim=dim, bins=bins)
    for codebook in rvq.codebooks:
        codebook.embed.mul_(0.06)
    x = torch.randn(4, dim, 100) * 0.06
    rvq.eval()
    want = rvq(x, return_embeddings=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rvq(x, return_embeddings=True)
        codes = rvq.encode(x)
    assert torch.equal(got.codes, want.codes), \
        f"{(got.codes != want.codes).float().mean():.1%} of the codes differ from float32"
    assert torch.equal(codes, want.codes)
    assert torch.equal(got.commit_loss, want.commit_loss)
    assert all(e.dtype == torch.float32 for e in got.embeddings)

    # k-means, dead codes and EMA in training: bit-identical codebooks.
    trained = []
    for amp in (False, True):
        torch.manual_seed(1)
        fresh = ResidualVectorQuantizer(dimension=dim, n_q=2, bins=64, kmeans_iters=5,
                                        kmeans_buffer=0).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            codes = [fresh(x).codes for _ in range(2)]
        trained.append((codes, fresh.state_dict()))
    for a, b in zip(trained[0][0], trained[1][0]):
        assert torch.equal(a, b)
    for name, value in trained[0][1].items():
        assert torch.equal(value, trained[1][1][name]), name


def test_quantized_keeps_the_dtype_of_the_input():
    rvq = inited_rvq().eval()
    out = rvq(torch.randn(2, DIM, 5, dtype=torch.bfloat16))
    assert out.quantized.dtype == torch.bfloat16
    assert out.commit_loss.dtype == torch.float32


# ------------------------------------------------------------------ 2 gloo processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_batch(rank: int, seed: int) -> torch.Tensor:
    """Each rank's batch; ranks hold different sizes on purpose."""
    generator = torch.Generator().manual_seed(seed + rank)
    return torch.randn(10 + 7 * rank, DIM, generator=generator) * 3


def buffers(codebook: EuclideanCodebook) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in codebook.named_buffers()}


def run_scenarios() -> dict[str, dict[str, torch.Tensor]]:
    """The same steps, run once per rank (distributed) or once on the whole batch (reference)."""
    world = distributed.world_size()
    rank = distributed.rank()
    batches = {seed: rank_batch(rank, seed) if world > 1
               else torch.cat([rank_batch(r, seed) for r in range(2)]) for seed in (10, 20)}
    results = {}
    # 1. EMA update of an initialised codebook without dead codes.
    codebook = inited_codebook(threshold=0.0).train()
    codebook(batches[10])
    results["ema"] = buffers(codebook)
    # 2. k-means init (and the dead-code replacement it triggers) from rank 0's RNG.
    torch.manual_seed(123)
    codebook = EuclideanCodebook(DIM, BINS, kmeans_iters=3, threshold_ema_dead_code=2).train()
    codebook(batches[20])
    results["kmeans"] = buffers(codebook)
    # 3. Dead-code replacement on an initialised codebook.
    torch.manual_seed(321)
    codebook = inited_codebook(threshold=2.0).train()
    codebook.cluster_size[[1, 5]] = 0.0
    codebook(batches[10])
    results["dead_code"] = buffers(codebook)
    # 4. Gather with unequal sizes.
    results["gather"] = {"x": distributed.all_gather_cat(batches[10])}
    # 5. k-means buffers filled over several steps and both ranks (27 vectors a step, 40 per
    # buffer): codebook 1 initialises at step 2, codebook 2 gathers from there, at step 3.
    torch.manual_seed(7 + rank)  # ranks draw differently: only rank 0's draws may count
    rvq = ResidualVectorQuantizer(dimension=DIM, n_q=2, bins=BINS, kmeans_iters=3,
                                  threshold_ema_dead_code=2, kmeans_buffer=5).train()
    for seed in (30, 40, 50, 60):
        step_batch = (rank_batch(rank, seed) if world > 1
                      else torch.cat([rank_batch(r, seed) for r in range(2)]))
        rvq(step_batch.unsqueeze(-1))  # [N, D, 1]: one frame per item
        results[f"rvq_step{seed}"] = {name: b.clone() for name, b in rvq.state_dict().items()}
    return results


def distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        torch.save(run_scenarios(), f"{out_dir}/rank{rank}.pt")
        distributed.barrier()
    finally:
        dist.destroy_process_group()


def test_codebooks_identical_across_ranks_and_equal_to_one_process_on_whole_batch(tmp_path):
    mp.spawn(distributed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = run_scenarios()
    fresh = 2 * 2.0 * (1 - 0.99)  # replaced codes start at twice the dead count
    assert ranks[0]["dead_code"]["cluster_size"][[1, 5]].min() >= 0.99 * fresh, "replacement ran"
    gathering = ranks[0]["rvq_step40"]
    assert gathering["vq.layers.0._codebook.inited"] == 1, "codebook 1 initialised at step 2"
    assert gathering["vq.layers.1._codebook.kmeans_samples"].shape[0] == 27, "codebook 2 gathers"
    assert ranks[0]["rvq_step50"]["vq.layers.1._codebook.inited"] == 1
    for scenario, expected in reference.items():
        for name, value in expected.items():
            assert torch.equal(ranks[0][scenario][name], ranks[1][scenario][name]), \
                f"{scenario}/{name} differs across ranks"
            torch.testing.assert_close(ranks[0][scenario][name], value,
                                       msg=f"{scenario}/{name} differs from one process")
