"""Measures of a codec: reconstruction and pair-cue metrics, probes, plots."""
