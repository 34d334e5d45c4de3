"""The pairwise objective across channel views of the same segment: `PairwiseLoss`.

The content codebook (default: codebook 1, index 0) should give the same embeddings for the
channels of one segment (similarity term), the channel codebook (default: codebook 2,
index 1) should carry what differs between them (diversity term, cross-reconstruction, and
the optional level-difference head). The terms themselves are plain tensor functions in
`modules/pairwise_terms.py` and `modules/pairwise_heads.py`; `PairwiseLoss` takes what they
need from one generator pass, switches them on, ramps and weighs them.

Two recipes are selected with the Hydra config group `pairwise=` (config/pairwise/):
- `seed`: the design document's recipe, MSE similarity on codebook 1 and negative-MSE
  diversity on codebook 2. Both depend on the embeddings' scale, and the similarity is won
  by a constant codebook 1 (collapse).
- `contrastive`: scale-free and collapse-proof terms. InfoNCE on codebook 1 (positives: the
  channels of one segment; negatives: the other segments of the global batch), normalised
  by log(number of candidates) so that a collapsed codebook scores 1 (chance) and a perfect
  one 0; a bounded cosine hinge on the centred codebook-2 embeddings; cross-reconstruction
  (`swap_latents`: content codebook of A + the other codebooks of B must decode to x_B).
  Optional terms, off in both recipes: code consensus (`code_consensus`: the views take the
  same content code) and invariance to a random channel-style change of a view.

Every loss is minimised; see `modules/pairwise_terms.py` for the sign of each diversity kind
(`neg_mse`: the logged `div` is <= 0 and falls as the channel embeddings move apart).
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from model import EncodecModel, EncodecOutput
from modules import channel_change, spatial_cues
from modules.losses import GeneratorLoss
from modules.pairwise_heads import (ChannelClassifier, LevelDifferenceHead,
                                    level_difference_loss, level_difference_pairs,
                                    reverse_gradient)
from modules.pairwise_terms import (InfoNCE, View, centred_cosine, check_views, code_consensus,
                                    diversity_loss, info_nce, similarity_loss, swap_latents,
                                    view_pairs)
from modules.views import split_views, unflatten_views

SCHEDULES = ('constant', 'linear')
# Weighted terms that join the generator loss, in the order they are summed (each present
# only when its part is on), and every logged value: the weighted terms and the unweighted,
# detached diagnostics. The names are logged as they are (wandb keys).
LOSS_TERMS = ('l_sim', 'l_div', 'l_cls', 'l_ild', 'l_ild_adv', 'l_xrec', 'l_cue', 'l_inv',
              'l_consensus')
LOGGED_TERMS = (*LOSS_TERMS, 'sim', 'div', 'nce_accuracy', 'div_cosine', 'cls', 'ild',
                'ild_adv', 'xrec', 'cue', 'inv', 'nce_accuracy_inv', 'consensus',
                'consensus_agreement')
UNSCHEDULED = ('l_cls',)  # the classifier keeps its weight from the first step on

# Unweighted terms of one part of the objective: the losses by the name of their weighted
# term (with their graph), and detached values for logging.
Terms = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def view_band_levels(audio: torch.Tensor, sample_rate: int, views: int,
                     n_bands: int = spatial_cues.CUE_BANDS) -> torch.Tensor:
    """Per-view band levels `[B, V, n_bands]` dB of `audio [B*V, 1, T]` (differentiable)."""
    n_fft = 2048 if audio.shape[-1] >= 2048 else 1024  # short (test) segments: coarser bins
    levels = spatial_cues.band_levels(audio.float(), sample_rate, n_bands=n_bands, n_fft=n_fft)
    return unflatten_views(levels, views)


class PairwiseLoss(nn.Module):
    """The pairwise objective of paired training, built from the `pairwise` config group.

    Terms (each with its weight; see config/pairwise/*.yaml for every key):
    - similarity on the content codebook (`sim_kind`: mse | cosine | infonce),
    - diversity on the channel codebook (`div_kind`: neg_mse | cosine | margin | cos_hinge),
    - cross-reconstruction (`xrec_weight`): `swap_latents(views)` decoded and scored against
      the other view's waveform in the reconstruction loss's units,
    - optional level-difference head on the channel codebook and its gradient-reversed twin
      on the content codebook (`ild_head`; under a shared content code the twin reads each
      view's own content latent), against the input pair's band levels,
    - cue fidelity (`cue_weight`): the decoded pair's per-band level differences against the
      input pair's (with `cue_shape`, each difference's mean over bands removed first: its
      spectral shape, which the autoencoder smooths away while it keeps the broadband part),
    - code consensus (`consensus_weight`): the views of a pair choose the same content code
      (with `shared_content_code`, each view's own content latent is pulled into the cell of
      the code the step decoded, the one its mean chose: codebook 1 coded on one channel
      alone then agrees with the shared code, and a level it carried would serve no decode),
    - invariance (`invariance_weight`): InfoNCE between the content codebook of a view and of
      the same view after a random channel-style change (`channel_change`),
    - optional channel-index classifier on the channel codebook (`channel_classifier`).

    The training step calls it once per step (`forward`) with the generator pass; validation
    scores the embeddings alone (`embedding_terms`). Switch-on: every term is 0 before
    `start_step` (and, with `wait_for_kmeans`, before every codebook has done its k-means);
    then 'constant' uses the weights as they are and 'linear' ramps them from 0 at the step
    they switched on to full `ramp_steps` later (the classifier keeps its own weight,
    unscheduled). `class_weights` multiplies the per-item similarity by a factor per scene
    class (classes not listed: 1.0). The heads' parameters belong to this module: the engine
    adds them to the generator optimizer and averages their gradients across ranks.

    Ranges and combinations of the settings are checked with the config
    (`training.configuration.LIMITS` and `check_settings`), not here.

    Args:
        sim_weight, div_weight (float): Weights of the similarity and diversity terms.
        sim_kind, div_kind, margin, max_cosine: See `similarity_loss` / `diversity_loss`.
        content_codebook, channel_codebook (int): Codebook indices whose embeddings should
            agree / differ across views.
        schedule (str): 'constant' or 'linear'.
        ramp_steps (int): Length of the linear ramp in optimizer steps.
        start_step (int): First optimizer step at which the terms count.
        class_weights (dict, optional): Similarity multiplier per scene class name.
        channel_classifier (bool): Add the auxiliary channel-classifier head.
        classifier_weight (float): Weight of the classifier cross-entropy.
        num_channels (int): Number of channel indices the head tells apart.
        dimension (int, optional): Embedding dimension (`model.dimension`), needed by the
            heads and the projection.
        temperature (float): InfoNCE temperature.
        nce_pooling (str): 'frame' or 'mean' (see `info_nce`).
        nce_center (bool): Centre the InfoNCE rows.
        nce_same_segment_negatives (bool): Per frame, other frames of the segment are negatives.
        nce_projection (int): Width of a learned linear projection before InfoNCE (0: none).
        xrec_weight (float): Weight of the cross-reconstruction loss.
        cue_weight (float): Weight of the cue-fidelity loss.
        cue_shape (bool): The cue-fidelity loss compares the differences' spectral shapes
            (each difference's mean over bands removed), not the differences themselves.
        shared_content_code (bool): The step codes the views' mean content latent once per
            segment with the content codebook (`EncodecModel.forward`'s `content_views`), each
            view decoding it with its own channel codebook; read by the training step.
        invariance_weight (float): Weight of the invariance loss.
        consensus_weight (float): Weight of the code-consensus loss.
        invariance_band_gain_db (float): Per-band gains of the change, uniform in +- this (dB).
        invariance_max_delay (float): Delay of the change, uniform in +- this (samples).
        ild_head (bool): Add the level-difference head and its reversed twin.
        ild_weight, ild_adv_weight (float): Weights of the head's and the twin's losses.
        ild_reversal (float): Gradient reversal factor between codebook 1 and the twin.
        ild_bands, ild_hidden (int): Bands predicted, hidden width of both heads.
        ild_floor_db (float): Floor of the loss normaliser (see `level_difference_loss`).
        wait_for_kmeans (bool): The terms also wait for every codebook's k-means.
        shared_scale (bool): The step normalises the views of an item by their common RMS
            (`EncodecModel.shared_scale`), so level differences between channels stay in the
            latent; read by the training step and the validation.
    """

    def __init__(self, sim_weight: float = 0.5, div_weight: float = 0.5, sim_kind: str = 'mse',
                 div_kind: str = 'neg_mse', margin: float = 1.0, content_codebook: int = 0,
                 channel_codebook: int = 1, schedule: str = 'constant', ramp_steps: int = 0,
                 class_weights: dict[str, float] | None = None, channel_classifier: bool = False,
                 classifier_weight: float = 0.1,
                 num_channels: int = 32, dimension: int | None = None, *,
                 start_step: int = 0, max_cosine: float = 0.0, temperature: float = 0.1,
                 nce_pooling: str = 'frame', nce_center: bool = True,
                 nce_same_segment_negatives: bool = False, nce_projection: int = 0,
                 xrec_weight: float = 0.0, ild_head: bool = False, ild_weight: float = 0.3,
                 ild_adv_weight: float = 0.3, ild_reversal: float = 1.0, ild_bands: int = 8,
                 ild_hidden: int = 128, ild_floor_db: float = 0.5,
                 wait_for_kmeans: bool = False, shared_scale: bool = False,
                 cue_weight: float = 0.0, invariance_weight: float = 0.0,
                 invariance_band_gain_db: float = 3.0, invariance_max_delay: float = 2.0,
                 consensus_weight: float = 0.0, cue_shape: bool = False,
                 shared_content_code: bool = False):
        super().__init__()
        # The one weight table: every weighted term is factor * weights[name] * its value.
        self.weights = {'l_sim': float(sim_weight), 'l_div': float(div_weight),
                        'l_cls': float(classifier_weight), 'l_ild': float(ild_weight),
                        'l_ild_adv': float(ild_adv_weight), 'l_xrec': float(xrec_weight),
                        'l_cue': float(cue_weight), 'l_inv': float(invariance_weight),
                        'l_consensus': float(consensus_weight)}
        self.sim_kind = sim_kind
        self.div_kind = div_kind
        self.margin = float(margin)
        self.max_cosine = float(max_cosine)
        self.content_codebook = int(content_codebook)
        self.channel_codebook = int(channel_codebook)
        self.schedule = schedule
        self.ramp_steps = int(ramp_steps)
        self.start_step = int(start_step)
        # The step the gate opened (-1: not yet), kept in checkpoints: with `wait_for_kmeans`
        # the gate can open well after `start_step`, and the ramp starts there, also after a
        # resume.
        self.register_buffer('switched_on_at', torch.tensor(-1, dtype=torch.long))
        self.wait_for_kmeans = bool(wait_for_kmeans)
        self.shared_scale = bool(shared_scale)
        self.class_weights = {str(k): float(v) for k, v in (class_weights or {}).items()}
        self.temperature = float(temperature)
        self.nce_pooling = nce_pooling
        self.nce_center = bool(nce_center)
        self.nce_same_segment_negatives = bool(nce_same_segment_negatives)
        self.invariance_band_gain_db = float(invariance_band_gain_db)
        self.invariance_max_delay = float(invariance_max_delay)
        self.ild_reversal = float(ild_reversal)
        self.ild_floor_db = float(ild_floor_db)
        self.cue_shape = bool(cue_shape)
        self.shared_content_code = bool(shared_content_code)

        def need_dimension(what: str) -> int:
            if dimension is None:
                raise ValueError(f"pairwise.{what} needs the embedding dimension: pass "
                                 "dimension=model.dimension")
            return int(dimension)

        self.classifier: ChannelClassifier | None = None
        if channel_classifier:
            self.classifier = ChannelClassifier(need_dimension('channel_classifier'),
                                                int(num_channels))
        self.projection: nn.Linear | None = None
        if nce_projection and sim_kind == 'infonce':
            self.projection = nn.Linear(need_dimension('nce_projection'), int(nce_projection),
                                        bias=False)
        self.ild_head: LevelDifferenceHead | None = None
        self.ild_twin: LevelDifferenceHead | None = None
        if ild_head:
            dim = need_dimension('ild_head')
            self.ild_head = LevelDifferenceHead(dim, int(ild_bands), int(ild_hidden))
            self.ild_twin = LevelDifferenceHead(dim, int(ild_bands), int(ild_hidden))

    @classmethod
    def from_config(cls, pairwise_cfg: tp.Any, dimension: int | None = None) -> "PairwiseLoss":
        """Build from the `pairwise` config group (`config/pairwise/*.yaml`); `dimension` is
        `model.dimension`."""
        cfg = pairwise_cfg
        head, ild = cfg.channel_classifier, cfg.ild_head
        return cls(sim_weight=cfg.sim_weight, div_weight=cfg.div_weight, sim_kind=cfg.sim_kind,
                   div_kind=cfg.div_kind, margin=cfg.margin,
                   content_codebook=cfg.content_codebook, channel_codebook=cfg.channel_codebook,
                   schedule=cfg.schedule, ramp_steps=cfg.ramp_steps,
                   class_weights=dict(cfg.class_weights or {}),
                   channel_classifier=bool(head.enabled), classifier_weight=float(head.weight),
                   num_channels=int(head.num_channels), dimension=dimension,
                   start_step=int(cfg.start_step), max_cosine=float(cfg.max_cosine),
                   temperature=float(cfg.temperature), nce_pooling=cfg.nce_pooling,
                   nce_center=bool(cfg.nce_center),
                   nce_same_segment_negatives=bool(cfg.nce_same_segment_negatives),
                   nce_projection=int(cfg.nce_projection or 0),
                   xrec_weight=float(cfg.xrec_weight),
                   ild_head=bool(ild.enabled), ild_weight=float(ild.weight),
                   ild_adv_weight=float(ild.adv_weight), ild_reversal=float(ild.reversal),
                   ild_bands=int(ild.n_bands), ild_hidden=int(ild.hidden),
                   ild_floor_db=float(ild.floor_db), wait_for_kmeans=bool(cfg.wait_for_kmeans),
                   shared_scale=bool(cfg.shared_scale), cue_weight=float(cfg.cue_weight),
                   invariance_weight=float(cfg.invariance.weight),
                   invariance_band_gain_db=float(cfg.invariance.band_gain_db),
                   invariance_max_delay=float(cfg.invariance.max_delay),
                   consensus_weight=float(cfg.consensus_weight),
                   cue_shape=bool(cfg.cue_shape),
                   shared_content_code=bool(cfg.shared_content_code))

    # ------------------------------------------------------------------ gate, ramp, weights
    def gate_open(self, step: int, codebooks_initialized: bool = True) -> bool:
        """Whether the terms may count at `step`: from `start_step` on, and with
        `wait_for_kmeans` once every codebook has done its k-means (contrast on provisional
        codes teaches nothing)."""
        return step >= self.start_step and (codebooks_initialized or not self.wait_for_kmeans)

    def schedule_factor(self, step: int, codebooks_initialized: bool = True) -> float:
        """Multiplier of the scheduled weights at optimizer step `step`: 0 while the gate is
        shut, then 1 ('constant') or a linear ramp from 0 at the step the gate opened
        (`switched_on_at`, recorded by `forward`; `start_step` until then)."""
        if not self.gate_open(step, codebooks_initialized):
            return 0.0
        if self.schedule == 'linear':
            origin = int(self.switched_on_at) if self.switched_on_at >= 0 else self.start_step
            return min(1.0, max(0, step - origin) / self.ramp_steps)
        return 1.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint from before the switch-on step was recorded ramped from start_step.
        state_dict.setdefault(prefix + 'switched_on_at', torch.tensor(self.start_step))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def is_active(self, step: int, codebooks_initialized: bool = True) -> bool:
        """Whether the scheduled terms count at `step` (the same on every rank: the step is
        global and the codebooks are identical everywhere)."""
        return self.schedule_factor(step, codebooks_initialized) > 0

    def uses(self, term: str) -> bool:
        """Whether the weighted term `term` (one of `LOSS_TERMS`) has a weight."""
        return self.weights[term] > 0

    def weigh(self, terms: Terms, factor: float) -> dict[str, torch.Tensor]:
        """The weighted terms (`factor * weight * value`; the unscheduled classifier without
        the factor) and the logged values, in one dict."""
        losses, logs = terms
        weighted = {name: (1.0 if name in UNSCHEDULED else factor) * self.weights[name] * value
                    for name, value in losses.items()}
        return {**weighted, **logs}

    # ------------------------------------------------------------------ one training step
    def forward(self, model: EncodecModel, out: EncodecOutput, x: torch.Tensor,
                scale: torch.Tensor | None, *, views: int, step: int,
                metas: tp.Sequence[dict[str, tp.Any]], reconstruction_loss: GeneratorLoss,
                autocast: tp.Callable[[], tp.ContextManager]) -> dict[str, torch.Tensor]:
        """Every term of one training step, from the generator pass `out` on `x [B*V, 1, T]`.

        Before the terms switch on (`is_active`) nothing is computed, unless the unscheduled
        channel classifier is on (the scheduled terms then weigh 0).

        Args:
            model (EncodecModel): The generator (the raw module): its decoder decodes the
                swapped latents, its encoder codes the invariance copy.
            out (EncodecOutput): The step's forward on `x`, with `embeddings`.
            x (torch.Tensor): The input views, `[B*V, 1, T]` (view-major inside an item).
            scale (torch.Tensor, optional): The scale the forward divided `x` by (None: the
                model's own, each item's RMS, or no normalisation).
            views (int): Views per item, V >= 2.
            step (int): Optimizer step, for the switch-on and the ramp.
            metas (list[dict]): Per item, its scene 'class' and its views' 'channels'.
            reconstruction_loss (GeneratorLoss): Scores the cross-reconstruction, in the
                units of the step's reconstruction loss (its weighted sum per item).
            autocast: The runtime's autocast context (for the extra decode and encode).
        Returns:
            dict: The weighted terms present (`LOSS_TERMS`), to add to the generator loss,
            and the unweighted, detached diagnostics (`LOGGED_TERMS`): 'sim', 'div', and when
            they apply 'nce_accuracy' (fraction of positives ranked first), 'div_cosine'
            (mean centred cosine of the channel codebook), 'cls', 'ild', 'ild_adv' (1 = no
            better than predicting no difference, 0 = exact; 'l_ild_adv' falls as the twin
            learns, while the reversed gradient makes the content codebook lose the level
            difference), 'xrec', 'cue', 'consensus', 'consensus_agreement', 'inv',
            'nce_accuracy_inv'.
        """
        if self.switched_on_at < 0 and self.gate_open(step, model.codebooks_initialized):
            self.switched_on_at.fill_(step)  # the same step on every rank: the gate is global
        factor = self.schedule_factor(step, model.codebooks_initialized)
        active = factor > 0
        if not active and self.classifier is None:
            return {}
        embeddings = split_views(out.embeddings, views)
        input_levels: dict[int, torch.Tensor] = {}

        def measured_levels(n_bands: int) -> torch.Tensor:
            """The input views' band levels, measured once per band count (no graph)."""
            if n_bands not in input_levels:
                with torch.no_grad():
                    input_levels[n_bands] = view_band_levels(x, model.sample_rate, views, n_bands)
            return input_levels[n_bands]

        ild_targets = None
        if active and self.ild_head is not None:
            ild_targets = measured_levels(self.ild_head.n_bands)
        # Each view's own content: one graph for code consensus and (under a shared content
        # code) the level twin.
        twin_reads_own = ild_targets is not None and self.shared_content_code
        own_content = None
        if active and (self.uses('l_consensus') or twin_reads_own):
            own_content = self.own_content(model, out, views)
        channels = torch.tensor([m['channels'] for m in metas])  # CPU: range-checked there
        losses, logs = self.view_terms(embeddings, [m['class'] for m in metas], channels,
                                       ild_targets, own_content if twin_reads_own else None)

        def add(terms: Terms) -> None:
            losses.update(terms[0])
            logs.update(terms[1])

        if active and self.uses('l_xrec'):
            with autocast():
                add(self.cross_reconstruction(model, embeddings, x, scale, reconstruction_loss))
        if active and self.uses('l_cue'):
            decoded = view_band_levels(out.audio, model.sample_rate, views)
            add(self.cue_fidelity(decoded, measured_levels(spatial_cues.CUE_BANDS)))
        if active and self.uses('l_consensus'):
            add(self.consensus_of_codes(model, own_content))
        if active and self.uses('l_inv'):
            add(self.invariance(model, embeddings, x, scale, views, autocast))
        return self.weigh((losses, logs), factor)

    def embedding_terms(self, views: tp.Sequence[View], step: int,
                        classes: tp.Sequence[str] | None = None,
                        channels: torch.Tensor | None = None,
                        ild_targets: torch.Tensor | None = None,
                        codebooks_initialized: bool = True) -> dict[str, torch.Tensor]:
        """The weighted terms and logs of the views' embeddings alone: similarity, diversity,
        and the heads whose inputs are given (what validation scores).

        Args:
            views: V >= 2 views' per-codebook embeddings (`split_views(out.embeddings, V)`).
            step (int): Optimizer step, for the switch-on and the ramp.
            classes (list[str], optional): Scene class per item, for `class_weights`.
            channels (torch.Tensor, optional): `[B, V]` channel indices, for the classifier.
            ild_targets (torch.Tensor, optional): Inter-channel level differences for the
                level-difference head: `[B, n_bands]` dB (level of view 0 minus view 1) or
                per-view band levels `[B, V, n_bands]` dB, measured on the pair at ONE scale.
            codebooks_initialized (bool): Whether every codebook has done its k-means.
        Returns:
            dict: as `forward`, for these terms. The heads need their inputs while gradients
            are enabled (training); under no_grad (validation) a head whose input is missing
            is left out.
        """
        if torch.is_grad_enabled():
            if self.classifier is not None and channels is None:
                raise ValueError("pairwise.channel_classifier.enabled needs the channel indices "
                                 "of each view (channels [B, V])")
            if self.ild_head is not None and ild_targets is None:
                raise ValueError("pairwise.ild_head.enabled needs the inter-channel level "
                                 "differences of each pair (ild_targets [B, n_bands] dB)")
        terms = self.view_terms(views, classes, channels, ild_targets)
        return self.weigh(terms, self.schedule_factor(step, codebooks_initialized))

    # ------------------------------------------------------------------ the terms
    def view_terms(self, views: tp.Sequence[View], classes: tp.Sequence[str] | None,
                   channels: torch.Tensor | None, ild_targets: torch.Tensor | None,
                   own_content: tp.Sequence[torch.Tensor] | None = None) -> Terms:
        """Similarity and diversity, and each head whose input is given (`own_content`: see
        `level_difference_terms`)."""
        check_views(views, self.content_codebook, self.channel_codebook)
        sim, sim_logs = self.similarity_terms(views)
        div, div_logs = self.diversity_terms(views)
        weighted_sim = sim
        if classes is not None and self.class_weights:
            if len(classes) != sim.shape[0]:
                raise ValueError(f"got {len(classes)} classes for a batch of {sim.shape[0]}")
            weighted_sim = sim * self.item_weights(classes, sim)
        losses = {'l_sim': weighted_sim.mean(), 'l_div': div.mean()}
        logs = {'sim': sim.mean().detach(), 'div': div.mean().detach(), **sim_logs, **div_logs}
        if self.classifier is not None and channels is not None:
            losses['l_cls'] = self.classifier_loss(views, channels)
            logs['cls'] = losses['l_cls'].detach()
        if self.ild_head is not None and ild_targets is not None:
            losses['l_ild'], losses['l_ild_adv'] = self.level_difference_terms(
                views, ild_targets, own_content)
            logs['ild'], logs['ild_adv'] = losses['l_ild'].detach(), losses['l_ild_adv'].detach()
        return losses, logs

    def item_weights(self, classes: tp.Sequence[str], like: torch.Tensor) -> torch.Tensor:
        """Per-item similarity multipliers `[B]` from the scene class names."""
        return torch.tensor([self.class_weights.get(c, 1.0) for c in classes],
                            dtype=like.dtype, device=like.device)

    def classifier_loss(self, views: tp.Sequence[View], channels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the channel index `channels [B, V]` from each view's channel-codebook
        embedding, averaged over items and views."""
        assert self.classifier is not None
        if channels.dim() != 2 or channels.shape[1] != len(views):
            raise ValueError(f"channels must be [B, V={len(views)}], got {tuple(channels.shape)}")
        # The bound check needs the values on the host; the collated metas are there already.
        if channels.device.type == 'cpu' and channels.numel() and (
                channels.min() < 0 or channels.max() >= self.classifier.num_channels):
            raise ValueError(f"channel index {int(channels.max())} out of range for "
                             f"pairwise.channel_classifier.num_channels="
                             f"{self.classifier.num_channels}")
        emb = torch.stack([view[self.channel_codebook] for view in views], dim=1)  # [B, V, D, F]
        logits = self.classifier(emb.flatten(0, 1))
        return F.cross_entropy(logits, channels.flatten().to(logits.device))

    def content_nce(self, a: View, b: View) -> InfoNCE:
        """`info_nce` of two views' content codebooks with this recipe's options."""
        return info_nce(a[self.content_codebook], b[self.content_codebook], self.temperature,
                        self.nce_pooling, self.nce_center, self.nce_same_segment_negatives,
                        projection=self.projection)

    def similarity_terms(self, views: tp.Sequence[View]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-item similarity `[B]` averaged over pairs, and detached extras for logging."""
        pairs = view_pairs(views)
        if self.sim_kind != 'infonce':
            sim = sum(similarity_loss(views[i][self.content_codebook],
                                      views[j][self.content_codebook], self.sim_kind, 'none')
                      for i, j in pairs) / len(pairs)
            return sim, {}
        results = [self.content_nce(views[i], views[j]) for i, j in pairs]
        sim = sum(r.loss for r in results) / len(results)
        accuracy = torch.stack([r.accuracy for r in results]).mean()
        return sim, {'nce_accuracy': accuracy}

    def diversity_terms(self, views: tp.Sequence[View]
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-item diversity `[B]` averaged over pairs, and detached extras for logging."""
        pairs = view_pairs(views)
        channel = [view[self.channel_codebook] for view in views]
        div = sum(diversity_loss(channel[i], channel[j], self.div_kind, self.margin, 'none',
                                 self.max_cosine) for i, j in pairs) / len(pairs)
        extras = {}
        if self.div_kind == 'cos_hinge':  # the hinge hides how alike the views are once met
            with torch.no_grad():
                extras['div_cosine'] = torch.stack([centred_cosine(channel[i], channel[j]).mean()
                                                    for i, j in pairs]).mean()
        return div, extras

    def level_difference_terms(self, views: tp.Sequence[View], ild_targets: torch.Tensor,
                               own_content: tp.Sequence[torch.Tensor] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted losses of the head on the channel codebook and of its twin behind a
        gradient reversal on the content codebook, averaged over view pairs.

        `own_content` (per view, `[B, D, F]`): what the twin reads instead of the content
        codebook's embeddings. Under a shared content code those are one code for every view,
        in which no level difference can be read; the content each view's encoder output
        would send on its own (`own_content`) is what must lose the level difference."""
        assert self.ild_head is not None and self.ild_twin is not None
        targets = level_difference_pairs(ild_targets, len(views), self.ild_head.n_bands)
        content = (own_content if own_content is not None
                   else [view[self.content_codebook] for view in views])
        plain, adversarial = [], []
        for p, (i, j) in enumerate(view_pairs(views)):
            target = targets[:, p]
            channel_i, channel_j = views[i][self.channel_codebook], views[j][self.channel_codebook]
            plain.append(level_difference_loss(self.ild_head(channel_i, channel_j), target,
                                               self.ild_floor_db))
            content_i = reverse_gradient(content[i], self.ild_reversal)
            content_j = reverse_gradient(content[j], self.ild_reversal)
            adversarial.append(level_difference_loss(self.ild_twin(content_i, content_j), target,
                                                     self.ild_floor_db))
        return torch.stack(plain).mean(), torch.stack(adversarial).mean()

    def cross_reconstruction(self, model: EncodecModel, views: tp.Sequence[View],
                             x: torch.Tensor, scale: torch.Tensor | None,
                             reconstruction_loss: GeneratorLoss) -> Terms:
        """Decode the content codebook of each view with the other codebooks of each other
        view (`swap_latents`) and score it against the other view's waveform, restored at
        that target's scale: 'xrec' is the mean of the per-item weighted reconstruction loss
        (the same weighted mel + L1 sum as the plain reconstruction)."""
        swap = swap_latents(views, self.content_codebook)
        # The embeddings are float32: in the audio's dtype (a no-op but in float64), as in
        # the forward.
        audio = model.decoder(swap.latents.to(x.dtype))[..., :x.shape[-1]]
        if scale is None:
            scale = model.normalize(x)[1]  # the targets' own scales (None: no normalisation)
        if scale is not None:
            audio = audio * scale[swap.target_index]
        target = x[swap.target_index]
        xrec = reconstruction_loss.weighted_sum(reconstruction_loss(target, audio)).mean()
        return {'l_xrec': xrec}, {'xrec': xrec.detach()}

    def cue_fidelity(self, decoded_levels: torch.Tensor, input_levels: torch.Tensor) -> Terms:
        """How far the decoded views' per-band level differences are from the input views'.

        The inter-channel level difference is the cue a pair of capsules carries about
        direction; only paired training sees both channels and can be asked to keep it.
        Scale-free like the level-difference head: `level_difference_loss` of the decoded
        differences against the input ones (1 = the decode has no difference at all, 0 =
        exact), over all view pairs. With `cue_shape` both differences lose their mean over
        bands first, so a decode that only gets the broadband level right scores 1.

        Args:
            decoded_levels, input_levels (torch.Tensor): Band levels `[B, V, n_bands]` dB of the
                decoded and the input views, both at the views' common scale (the decode
                differentiable, the input without a graph).
        Returns:
            Terms: 'l_cue' (unweighted) and its log 'cue'.
        """
        views, bands = decoded_levels.shape[1:]
        decoded = level_difference_pairs(decoded_levels, views, bands)
        target = level_difference_pairs(input_levels, views, bands)
        if self.cue_shape:
            decoded = decoded - decoded.mean(dim=-1, keepdim=True)
            target = target - target.mean(dim=-1, keepdim=True)
        cue = level_difference_loss(decoded, target, self.ild_floor_db)
        return {'l_cue': cue}, {'cue': cue.detach()}

    def own_content(self, model: EncodecModel, out: EncodecOutput,
                    views: int) -> tuple[torch.Tensor, ...]:
        """What the content codebook quantizes of each view on its own, per view `[B, D, F]`:
        the encoder output (before a shared content code replaced it by the views' mean)
        minus the earlier codebooks' vectors, on the dimensions the codebook codes
        (`model.content_share`), with its graph."""
        k = self.content_codebook
        codebook = model.quantizer.codebooks[k]
        residual = out.latent.float()
        for earlier in out.embeddings[:k]:
            residual = residual - earlier.detach()
        residual = residual * codebook.dims[:, None]
        return unflatten_views(residual, views).unbind(1)

    def consensus_of_codes(self, model: EncodecModel,
                           own_content: tp.Sequence[torch.Tensor]) -> Terms:
        """`code_consensus` on what the content codebook quantizes of each view on its own
        (`own_content`)."""
        codebook = model.quantizer.codebooks[self.content_codebook]
        return self.code_consensus_terms(own_content, codebook.embed * codebook.dims)

    def code_consensus_terms(self, residuals: tp.Sequence[torch.Tensor],
                             embed: torch.Tensor) -> Terms:
        """`code_consensus` of every view pair on the content codebook.

        Args:
            residuals: Per view, the vectors `[B, D, F]` the content codebook quantized (the
                encoder output minus the earlier codebooks' vectors), with their graph.
            embed (torch.Tensor): The content codebook's codes `[K, D]`.
        Returns:
            Terms: 'l_consensus' (unweighted), logged as 'consensus' (0 = every frame takes
            the pair's code), and 'consensus_agreement' (fraction of frames coded alike).
        """
        results = [code_consensus(residuals[i], residuals[j], embed)
                   for i, j in view_pairs(residuals)]
        consensus = torch.stack([r.loss.mean() for r in results]).mean()
        agreement = torch.stack([r.agreement for r in results]).mean()
        return ({'l_consensus': consensus},
                {'consensus': consensus.detach(), 'consensus_agreement': agreement})

    def invariance(self, model: EncodecModel, views: tp.Sequence[View], x: torch.Tensor,
                   scale: torch.Tensor | None, num_views: int,
                   autocast: tp.Callable[[], tp.ContextManager]) -> Terms:
        """Encode a random channel-style change of each item's first view, at that view's own
        normalisation scale (so the change's level stays in the latent), and score its content
        codes against the view's (`invariance_terms`). The codebooks see it without updating
        (`quantizer.embeddings`): the item counts once in their statistics."""
        first = unflatten_views(x, num_views)[:, 0]
        changed = channel_change.random_channel_change(first, model.sample_rate,
                                                       self.invariance_band_gain_db,
                                                       self.invariance_max_delay)
        first_scale = (model.normalize(first)[1] if scale is None
                       else unflatten_views(scale, num_views)[:, 0])
        with autocast():
            latent = model.encoder(model.normalize(changed, first_scale)[0])
        return self.invariance_terms(views[0], model.quantizer.embeddings(latent))

    def invariance_terms(self, view: View, changed: View) -> Terms:
        """InfoNCE between the content codebook of a view and of the same segment after a
        random channel-style change (per-band gains and a small delay, what differs between two
        capsules): the content codebook should choose the same codes for both.

        The real second channel is a positive of the same kind (`similarity_terms`), but it
        differs from the first by more than the channel (diffuse and capsule noise are
        incoherent between capsules); this positive differs by the channel's cues alone, at a
        size set by the config, so it asks for exactly the invariance that leaves those cues to
        the channel codebook. Options (temperature, pooling, centring, negatives) are the
        similarity term's.

        Args:
            view (View): Per-codebook embeddings of the views' first channel (`[B, D, F]` each).
            changed (View): The same for its changed copy.
        Returns:
            Terms: 'l_inv' (unweighted), logged as 'inv' (normalised InfoNCE, 1 = chance), and
            'nce_accuracy_inv' (fraction of anchors whose changed copy ranks first).
        """
        nce = self.content_nce(view, changed)
        inv = nce.loss.mean()
        return {'l_inv': inv}, {'inv': inv.detach(), 'nce_accuracy_inv': nce.accuracy}
