"""Scoring models, the evaluation room: `evaluate` holds generation with the recurrent state, GSM8K-style exact
match, held-out loss and reading problem sets. Training uses it for samples; the method comparison (in
src/diagnostics/compare.py) and `python -m scripts.eval` use it to score runs."""
