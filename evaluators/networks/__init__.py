"""Scorer networks, each from explicit local files: Inception, CLIP/HPS/PickScore (clip_scores.py),
the ImageReward port and its BLIP (image_reward.py, blip.py), the registry of staged weights
(weights.py) and the factory by metric name (scorers.py).
"""
