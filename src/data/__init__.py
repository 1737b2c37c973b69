"""Data pipeline: World tokenizer, binidx files, jsonl readers and the datasets the trainer consumes."""
