"""Error types the project raises for bad input. Each message says what is wrong and how to fix it."""


class RWKVBoneError(Exception):
    """Base class of every error we raise on purpose for bad input or configuration."""


class CheckpointError(RWKVBoneError):
    """A model checkpoint or training state is missing, corrupt, unsafe or does not fit."""


class AdapterError(RWKVBoneError):
    """An adapter file or adapter configuration is corrupt or does not fit its base model."""


class DataError(RWKVBoneError):
    """A data file is missing, corrupt, out of range or empty."""


class ConfigError(RWKVBoneError):
    """A configuration value is invalid."""


class WriteError(RWKVBoneError):
    """A file could not be written (disk full, no permission); its previous version is kept."""
