"""GenEval: the official rules and aggregation (official.py), its results.jsonl schema
(results.py), the detectors (detectors.py) and GenEval-world on the embedded world (world.py).
"""
