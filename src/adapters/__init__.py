"""Adapters: Bone (row/col, ablations), LoRA and PiSSA; injection, adapter files and merging.

Public API: AdapterConfig, inject_adapters, adapter_parameters, adapter_state_dict, save_adapter,
load_adapter_file, load_adapter_into, merge_weight, unmerge_weight, merge_state_dict, unmerge_state_dict,
merge_checkpoint_file, parameter_table, count_adapter_parameters.
"""
from src.adapters.config import AdapterConfig
from src.adapters.export import merge_checkpoint_file
from src.adapters.files import load_adapter_file
from src.adapters.inject import (
                                 adapter_parameters,
                                 adapter_state_dict,
                                 count_adapter_parameters,
                                 inject_adapters,
                                 load_adapter_into,
                                 parameter_table,
                                 save_adapter,
)
from src.adapters.merge import merge_state_dict, merge_weight, unmerge_state_dict, unmerge_weight

__all__ = ["AdapterConfig", "inject_adapters", "adapter_parameters", "adapter_state_dict", "save_adapter",
           "load_adapter_file", "load_adapter_into", "merge_weight", "unmerge_weight", "merge_state_dict",
           "unmerge_state_dict", "merge_checkpoint_file", "parameter_table", "count_adapter_parameters"]
