"""Process settings of the command line (privenc/runtime.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = ("import os; from privenc.runtime import keep_freed_memory, tune_process; tune_process(); "
         "print(keep_freed_memory(), os.environ['OMP_WAIT_POLICY'])")


def _probe(**env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "PRIVENC_MALLOC_TUNING")}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc tuning applies to glibc only")
def test_malloc_tuning_is_applied_on_glibc_and_can_be_switched_off() -> None:
    assert _probe() == ["True", "PASSIVE"]
    assert _probe(PRIVENC_MALLOC_TUNING="0") == ["False", "PASSIVE"]
    assert _probe(PRIVENC_MALLOC_TUNING="off")[0] == "False"


def test_a_wait_policy_set_by_the_user_wins() -> None:
    assert _probe(OMP_WAIT_POLICY="ACTIVE")[1] == "ACTIVE"
