"""Exporting a (merged) model to the formats the inference engines load: .pth and .safetensors (the official
checkpoint, src/adapters/export.py), GGUF for llama.cpp (`gguf.py`), a Hugging Face folder (`hf.py`), Ai00 /
web-rwkv `.st` (`ai00.py`), and adapters in peft's on-disk format (`peft.py`). `convert.py` is the one entry
merge_bone.py calls. Every writer takes the model one tensor at a time (src.adapters.export.MergedCheckpoint)
and writes atomically."""
