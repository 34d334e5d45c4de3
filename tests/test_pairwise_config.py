"""The `pairwise=` config group: the recipes' files, their composition from the command line
and `PairwiseLoss.from_config` reading every key."""
from __future__ import annotations

import torch
import yaml
from omegaconf import OmegaConf

from conftest import ROOT
from pairwise_losses import PairwiseLoss
from test_pairwise_losses import random_views


def group_file(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / "pairwise" / f"{name}.yaml").read_text())


def test_paired_default_is_contrastive_and_seed_is_the_design_documents_recipe(cfg_factory):
    assert (OmegaConf.to_container(cfg_factory("config_paired_nq2").pairwise)
            == group_file("contrastive"))
    assert OmegaConf.to_container(cfg_factory("config_mono_nq2").pairwise) == group_file("seed")
    cfg = cfg_factory("config_paired_nq2", ["pairwise=seed"])  # the document, one override away
    assert OmegaConf.to_container(cfg.pairwise) == group_file("seed")
    seed = group_file("seed")
    assert (seed['sim_kind'], seed['div_kind'], seed['sim_weight'], seed['div_weight']) == (
        'mse', 'neg_mse', 0.5, 0.5)
    assert seed['xrec_weight'] == 0 and seed['start_step'] == 0 and seed['cue_weight'] == 0
    assert not seed['shared_scale'] and not seed['wait_for_kmeans']
    assert not seed['ild_head']['enabled'] and not seed['channel_classifier']['enabled']
    assert seed['consensus_weight'] == 0 and seed['invariance']['weight'] == 0
    # The default codes the views' mean content once, pulls each view's own code to it, and
    # needs no cross-reconstruction (with one shared code it is the reconstruction).
    contrastive = group_file("contrastive")
    assert contrastive['shared_content_code'] and contrastive['consensus_weight'] > 0
    assert contrastive['xrec_weight'] == 0
    # The document's quantizer is EnCodec's RVQ; the paired default splits it, mono does not.
    assert cfg_factory("config_paired_nq2").model.content_share == 0.5
    assert cfg_factory("config_mono_nq2").model.content_share == 0


def test_contrastive_group_composes_from_the_command_line(cfg_factory):
    cfg = cfg_factory("config_paired_nq2", ["pairwise=contrastive", "pairwise.sim_weight=1.0",
                                            "pairwise.ild_head.enabled=true"])
    assert (cfg.pairwise.sim_kind, cfg.pairwise.div_kind) == ('infonce', 'cos_hinge')
    assert cfg.pairwise.sim_weight == 1.0 and cfg.pairwise.ild_head.enabled
    loss = PairwiseLoss.from_config(cfg.pairwise, dimension=cfg.model.dimension)
    contrastive = group_file("contrastive")
    assert (loss.sim_kind, loss.div_kind, loss.temperature, loss.nce_pooling,
            loss.weights['l_xrec'], loss.start_step, loss.max_cosine) == (
        'infonce', 'cos_hinge', contrastive['temperature'], contrastive['nce_pooling'],
        contrastive['xrec_weight'], contrastive['start_step'], contrastive['max_cosine'])
    assert loss.ild_head is not None and loss.ild_twin is not None
    out = loss.embedding_terms(random_views(2, dim=cfg.model.dimension), step=10_000,
               ild_targets=torch.randn(3, contrastive['ild_head']['n_bands']))
    assert set(out) >= {'l_sim', 'l_div', 'l_ild', 'l_ild_adv', 'nce_accuracy'}
    seed_override = cfg_factory("config_paired_nq2", ["pairwise=seed", "pairwise.xrec_weight=1.0"])
    assert PairwiseLoss.from_config(seed_override.pairwise).uses('l_xrec')


def test_from_config_reads_every_key(cfg_factory):
    # Every key of the group set away from both recipes' values must reach PairwiseLoss.
    values = {"sim_weight": 0.7, "div_weight": 0.3, "sim_kind": "infonce", "div_kind": "margin",
              "margin": 2.0, "max_cosine": 0.25, "content_codebook": 1, "channel_codebook": 0,
              "start_step": 7, "schedule": "linear", "ramp_steps": 9,
              "class_weights": {"Beach": 2.0}, "temperature": 0.07, "nce_pooling": "mean",
              "nce_center": False, "nce_same_segment_negatives": True, "nce_projection": 5,
              "xrec_weight": 0.4, "channel_classifier.enabled": True,
              "channel_classifier.weight": 0.2, "channel_classifier.num_channels": 6,
              "ild_head.enabled": True, "ild_head.n_bands": 5, "ild_head.hidden": 11,
              "ild_head.weight": 0.6, "ild_head.adv_weight": 0.9, "ild_head.reversal": 0.5,
              "ild_head.floor_db": 2.0, "wait_for_kmeans": True, "shared_scale": True,
              "cue_weight": 0.8, "cue_shape": True, "shared_content_code": True,
              "consensus_weight": 1.5,
              "invariance.weight": 0.7,
              "invariance.band_gain_db": 4.0, "invariance.max_delay": 1.5}
    heads = ("channel_classifier", "ild_head", "invariance")
    optimizer_keys = {"head_lr"}  # the optimizer's (test_training_step), not the loss's
    assert set(values) == {f"{k}.{sub}" if k in heads else k
                           for k, v in group_file("seed").items()
                           for sub in (v if k in heads else [None])} - optimizer_keys
    overrides = [f"pairwise.{k}={v}" for k, v in values.items() if k != "class_weights"]
    cfg = cfg_factory("config_paired_nq2", [*overrides, "+pairwise.class_weights.Beach=2.0"])
    loss = PairwiseLoss.from_config(cfg.pairwise, dimension=4)
    read = {"sim_weight": loss.weights['l_sim'], "div_weight": loss.weights['l_div'],
            "sim_kind": loss.sim_kind, "div_kind": loss.div_kind, "margin": loss.margin,
            "max_cosine": loss.max_cosine, "content_codebook": loss.content_codebook,
            "channel_codebook": loss.channel_codebook, "start_step": loss.start_step,
            "schedule": loss.schedule, "ramp_steps": loss.ramp_steps,
            "class_weights": loss.class_weights, "temperature": loss.temperature,
            "nce_pooling": loss.nce_pooling, "nce_center": loss.nce_center,
            "nce_same_segment_negatives": loss.nce_same_segment_negatives,
            "nce_projection": loss.projection.out_features, "xrec_weight": loss.weights['l_xrec'],
            "channel_classifier.enabled": loss.classifier is not None,
            "channel_classifier.weight": loss.weights['l_cls'],
            "channel_classifier.num_channels": loss.classifier.num_channels,
            "ild_head.enabled": loss.ild_head is not None,
            "ild_head.n_bands": loss.ild_twin.n_bands,
            "ild_head.hidden": loss.ild_head.mlp[0].out_features,
            "ild_head.weight": loss.weights['l_ild'],
            "ild_head.adv_weight": loss.weights['l_ild_adv'],
            "ild_head.reversal": loss.ild_reversal, "ild_head.floor_db": loss.ild_floor_db,
            "wait_for_kmeans": loss.wait_for_kmeans, "shared_scale": loss.shared_scale,
            "cue_weight": loss.weights['l_cue'], "cue_shape": loss.cue_shape,
            "shared_content_code": loss.shared_content_code,
            "consensus_weight": loss.weights['l_consensus'],
            "invariance.weight": loss.weights['l_inv'],
            "invariance.band_gain_db": loss.invariance_band_gain_db,
            "invariance.max_delay": loss.invariance_max_delay}
    assert read == values


def test_group_files_hold_the_same_keys():
    def keys(tree: dict, prefix: str = '') -> set[str]:
        return {f"{prefix}{k}" for k in tree} | {
            k for name, v in tree.items() if isinstance(v, dict) and v
            for k in keys(v, f"{prefix}{name}.")}
    assert keys(group_file("seed")) == keys(group_file("contrastive"))


def test_selected_group_keeps_its_weights_in_the_paired_config(cfg_factory):
    # config_paired_nq2 sets no pairwise key itself: each recipe arrives whole.
    for recipe in ("seed", "contrastive"):
        cfg = cfg_factory("config_paired_nq2", [f"pairwise={recipe}"])
        assert cfg.pairwise.sim_weight == group_file(recipe)['sim_weight']
        assert cfg.pairwise.cue_weight == group_file(recipe)['cue_weight']
