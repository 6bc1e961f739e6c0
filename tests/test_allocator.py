"""keep_freed_memory: glibc's malloc then serves a DiT forward's activations from memory it kept, without
faulting fresh pages in on every call."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from calicache.utils import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import calicache
torch.set_num_threads(2)  # the demo's threads (with 1, glibc's defaults fault far less)
model = calicache.load_model("fmnist-dit").eval()
x, t, y = torch.randn(80, 1, 28, 28), torch.full((80,), 500), torch.arange(80) % 10  # the demo's batch
faults = []
with torch.no_grad():
    for i in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x, t, y)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[2:]))
"""


def faults_per_round(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults():
    applied, kept = faults_per_round("keep")
    if applied != "True":
        pytest.skip("not glibc")
    # One call's activations at this batch: 49 tokens x 80 rows x up to 768 floats per tensor, 12 MB each.
    assert kept < 500
    _, default = faults_per_round("default")
    if default <= 5000:  # how much glibc's defaults fault depends on its version and the machine
        pytest.skip(f"glibc's defaults faulted only {default} times per call here: nothing to compare")
    assert kept * 10 < default  # they map and fault the activations in again on every call


def test_opt_out_and_users_malloc_settings_are_respected():
    assert faults_per_round("keep", CALICACHE_KEEP_FREED_MEMORY="0")[0] == "False"
    assert faults_per_round("keep", MALLOC_TRIM_THRESHOLD_="1000000")[0] == "False"
