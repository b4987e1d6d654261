"""Building the CPU kernels survives a build that was killed (via_sd_kernels/cpu/__init__.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from torch.utils import cpp_extension

from via_sd_kernels import cpu


def _fake_load(seen: list, lock_path):
    def load(**kw):
        # torch's builder would wait for as long as this file exists
        seen.append(lock_path.exists())

    return load


def test_a_lock_file_left_by_a_killed_build_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("VIA_SD_KERNEL_CACHE", str(tmp_path))
    d = cpu._build_dir()
    d.mkdir(parents=True)
    (d / "lock").touch()  # what torch's builder leaves when its process is killed mid-build
    seen: list[bool] = []
    monkeypatch.setattr(cpp_extension, "load", _fake_load(seen, d / "lock"))
    assert cpu._build()
    assert seen == [False]


def test_a_live_builder_is_waited_for_and_a_killed_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("VIA_SD_KERNEL_CACHE", str(tmp_path))
    d = cpu._build_dir()
    d.mkdir(parents=True)
    # another process building: holds the guard, its torch lock file present
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
         "open(sys.argv[2], 'w').close(); print('held', flush=True); time.sleep(600)",
         str(d / "via-sd-build.flock"), str(d / "lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        seen: list[bool] = []
        monkeypatch.setattr(cpp_extension, "load", _fake_load(seen, d / "lock"))
        t = threading.Thread(target=cpu._build, daemon=True)
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and seen == []  # waits while the builder lives
        assert (d / "lock").exists()
        holder.kill()  # killed mid-build: its lock file stays, its flock goes
        holder.wait()
        t.join(10)
        assert not t.is_alive() and seen == [False]
    finally:
        holder.kill()
        holder.wait()
