"""Metric maths: FID from statistics (fid.py), IS and precision/recall/density/coverage
(image_metrics.py), clean-fid's FID-30k (clean_fid.py), and world-FID on the embedded world
(world_eval.py).
"""
