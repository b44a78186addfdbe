"""Text detection (DBNet on timm backbones), piece by piece, as MMOCR splits it: geometry of polygons, the
ICDAR 2015 H-mean, DB targets (shrunk text kernels and threshold-map borders), the DB head and loss,
post-processing of probability maps into scored polygons, and box voting over several models.

Each piece is importable on its own; OpenCV, pyclipper and shapely are imported where they are used."""
