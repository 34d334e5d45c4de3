"""EigenScape's scene classes, in one place for the dataset and the synthetic generator
(which must run without torch, so it cannot import the dataset module)."""

SCENE_CLASSES = ["Beach", "Busy Street", "Park", "Pedestrian Zone", "Quiet Street",
                 "Shopping Centre", "Train Station", "Woodland"]
