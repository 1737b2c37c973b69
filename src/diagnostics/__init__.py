"""Diagnostics, the room for studying, checking and measuring the trainer itself: the method comparison
(`compare`: every PEFT method fine-tuned by train.py from one base with identical data, then scored and
plotted), random x060
checkpoints of any size (`random_model`, the one builder the tests, dry runs and checks share), training-step
speed and memory measurements (`train_step`), the GPU check's sections and driver (`sections`, `gpu_check`),
the CUDA kernel's build environment (`cuda_env`) and running a measurement in a fresh, time-boxed process
(`processes`). The CLIs over them are `python -m scripts.compare_methods`, `python -m scripts.gpu_check` and
`python -m scripts.bench.train_step`."""
