"""The RWKV World vocabulary (rwkv_vocab_v20230424.txt, shipped in the `rwkv` pip package): where it is, and its
tokens. Each line is `<id> <Python literal of the token: str or bytes> <length in bytes>`; ids run 1..65529 and
id 0 is the end-of-text token, which has no line."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from src.errors import ConfigError

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536  # the World models' embedding rows (65530 tokens, padded)


def world_vocab_path() -> Path:
    """The vocabulary file of the installed `rwkv` package (found without importing it)."""
    spec = importlib.util.find_spec("rwkv")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return path
    raise ConfigError(f"the World vocabulary ({VOCAB_FILE}) comes with the `rwkv` package, which is not installed "
                      f"here: pip install rwkv (see requirements.txt).")


def world_tokens(path: Path | None = None) -> list[bytes]:
    """The tokens by id (index 0, the end-of-text token, is b""). ConfigError for a malformed file."""
    path = path or world_vocab_path()
    tokens = [b""]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        first, _, rest = line.partition(" ")
        literal, _, length = rest.rpartition(" ")
        token = ast.literal_eval(literal)
        token = token.encode("utf-8") if isinstance(token, str) else token
        if int(first) != len(tokens) or not isinstance(token, bytes) or len(token) != int(length):
            raise ConfigError(f"{path}:{number}: not a World vocabulary line (id {first}, expected {len(tokens)}).")
        tokens.append(token)
    return tokens
