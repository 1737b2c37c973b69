"""PLACEHOLDER (owned by the adapters work): names of adapter tensors, injection and adapter loading."""
ADAPTER_TENSOR_SUFFIXES: tuple[str, ...] = (".bone", ".bone_A", ".bone_B", ".lora_A", ".lora_B")
