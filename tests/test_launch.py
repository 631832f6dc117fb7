"""Start-up settings of kdlab-train: glibc allocator and Lightning's NVML check."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _python(code: str, **env: str) -> str:
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environment.update(env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, check=True)
    return proc.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_allocator_is_tuned_once_unless_the_user_set_malloc_variables():
    code = "from kdlab.util.runtime import tune_allocator as t; print(t(), t())"
    assert _python(code) == "True True"
    assert _python(code, MALLOC_TRIM_THRESHOLD_="131072") == "False False"


def test_failing_nvml_check_is_switched_off_and_a_working_one_kept():
    code = ("import ctypes, os; from kdlab.util.runtime import skip_failing_nvml_check as s\n"
            "try:\n    ctypes.CDLL('libnvidia-ml.so.1'); nvml = True\n"
            "except OSError:\n    nvml = False\n"
            "print(nvml, s(), os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'])")
    nvml, changed, value = _python(code, PYTORCH_NVML_BASED_CUDA_CHECK="1").split()
    if nvml == "True":
        assert (changed, value) == ("False", "1")
    else:
        assert (changed, value) == ("True", "0")
    assert _python(code, PYTORCH_NVML_BASED_CUDA_CHECK="0").split()[1:] == ["False", "0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_free_memory_held_inside_the_heap_is_returned_between_stages():
    """Under the tuned thresholds, 300 MB freed below a small live block stay in the process
    (the heap can only shrink from its top); release_free_memory hands them back."""
    code = (
        "import torch\n"
        "from kdlab.util.runtime import release_free_memory, tune_allocator\n"
        "tune_allocator()\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "big = [torch.ones(2**18) for _ in range(300)]  # 300 x 1 MB, under the mmap threshold\n"
        "pin = torch.ones(2**18)  # 1 MB above them (no free chunk below fits it): the top\n"
        "del big\n"
        "held = rss()\n"
        "print(release_free_memory(), round(held - rss()))\n"
    )
    ran, returned = _python(code).split()
    assert ran == "True" and int(returned) > 250
