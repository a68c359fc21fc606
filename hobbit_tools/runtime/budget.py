"""Memory budgets: "6GiB", "1.5 GB", "30%" (of the high-precision expert bytes), or bytes."""

from __future__ import annotations

import re

from ..errors import HobbitError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip


def parse_memory(spec: int | float | str, expert_bytes: int) -> int:
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return int(spec)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", str(spec))
    if not m or (m.group(2) != "%" and m.group(2).lower() not in _UNITS):
        raise HobbitError(
            f"memory budget {spec!r} is not understood: use bytes, a size like '1.5GiB' or "
            "'800MB', or a share of the expert bytes like '30%'"
        )
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        return int(expert_bytes * value / 100)
    return int(value * _UNITS[unit.lower()])
