"""Board and target descriptions (one TOML per board) and the registry that reads them."""

from .registry import (
    EMULATED_CPUS,
    BoardSpec,
    board_from_mapping,
    builtin_board_names,
    list_boards,
    load_board_file,
    resolve_target,
)

__all__ = [
    "EMULATED_CPUS",
    "BoardSpec",
    "board_from_mapping",
    "builtin_board_names",
    "list_boards",
    "load_board_file",
    "resolve_target",
]
