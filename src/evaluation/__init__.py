"""Scoring models, the evaluation room: `evaluate` holds generation with the recurrent state, GSM8K-style exact
match, held-out loss and reading problem sets; `compare` drives the method comparison (every PEFT method
fine-tuned by train.py from one base with identical data, then scored and plotted). The CLIs over them are
`python -m scripts.eval` and `python -m scripts.compare_methods`."""
