"""EigenScape's scene classes and the em32 array's geometry, in one place for the dataset,
the evaluation and the synthetic generator (numpy only: the generator runs without torch)."""

import numpy as np

SCENE_CLASSES = ["Beach", "Busy Street", "Park", "Pedestrian Zone", "Quiet Street",
                 "Shopping Centre", "Train Station", "Woodland"]

# Colatitude / azimuth (degrees) of em32 capsules 1-32 (fixtures README).
EM32_ANGLES_DEG = [
    (69, 0), (90, 32), (111, 0), (90, 328), (32, 0), (55, 45), (90, 69), (125, 45),
    (148, 0), (125, 315), (90, 291), (55, 315), (21, 91), (58, 90), (121, 90), (159, 89),
    (69, 180), (90, 212), (111, 180), (90, 148), (32, 180), (55, 225), (90, 249), (125, 225),
    (148, 180), (125, 135), (90, 111), (55, 135), (21, 269), (58, 270), (122, 270), (159, 271),
]


def unit_vectors(colatitude_deg: np.ndarray, azimuth_deg: np.ndarray) -> np.ndarray:
    """Unit vectors [..., 3] from colatitude and azimuth in degrees."""
    th, ph = np.radians(colatitude_deg), np.radians(azimuth_deg)
    return np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], axis=-1)


CAPSULES = unit_vectors(*np.array(EM32_ANGLES_DEG, dtype=np.float64).T)  # [32, 3]
N_CAPSULES = len(CAPSULES)
