"""A deep copy of nested JSON-like data with one key changed or removed: for malformed-file tests."""

from __future__ import annotations

import copy


def edited(base: dict, path: list, value=None, delete: bool = False) -> dict:
    data = copy.deepcopy(base)
    node = data
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data
