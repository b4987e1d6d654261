"""Print the pinned requirement of one dependency from pyproject.toml, e.g. `torch==2.13.0`.

The images install torch from a CPU-only or CUDA index before `make install`, so that pip finds
the pin already satisfied; reading the pin here keeps pyproject.toml the only copy of it.
Usage: python docker/pyproject_pin.py torch [pyproject.toml]
"""

from __future__ import annotations

import re
import sys
import tomllib


def pin(name: str, pyproject: str = "pyproject.toml") -> str:
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    for dep in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)", dep)
        if m and m.group(1).lower().replace("_", "-") == name.lower().replace("_", "-"):
            return dep.strip()
    raise SystemExit(f"pyproject_pin: {name!r} is not a dependency in {pyproject}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: pyproject_pin.py NAME [pyproject.toml]")
    print(pin(*sys.argv[1:]))
