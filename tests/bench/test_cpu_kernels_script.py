"""benchmarks/cpu_kernels.py --only layouts: both layouts of the bundled model's layers, timed
taking turns, one line a pass size."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.bench import load_script

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the CPU kernels")


def test_layouts_times_both_layouts_at_each_pass_size(real_model_dir, capsys):
    mod = load_script("cpu_kernels")
    mod.layouts([1, 3], rounds=2)
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"kernels read GGUF's layout from (no|\d+) tokens on this host", out[0])
    rows = [re.fullmatch(r"layers +(\d+) tokens: GGUF +([\d.]+) ms +interleaved +([\d.]+) ms +"
                         r"interleaved / GGUF ([\d.]+) \[([\d.]+), ([\d.]+)\]", line) for line in out[1:]]
    assert all(rows) and [int(r.group(1)) for r in rows] == [1, 3]
    for r in rows:
        gguf, inter, ratio, lo, hi = (float(r.group(i)) for i in range(2, 7))
        assert gguf > 0 and inter > 0 and lo <= ratio <= hi
