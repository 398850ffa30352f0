"""The sweep machinery behind ``python -m orchestrator.sweep``: the sweep file's schema and its
expansion into trials (schema.py, spec.py), the folder layout and the frozen context sent to Ray
(layout.py), the Ray Tune trial driving a Ray Train job (trial.py), the evaluator pool and the
sweep's side of evaluation (pool.py, evaluation.py), and placement-group cleanup (pg_cleanup.py).
"""
