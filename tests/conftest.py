"""Test-session setup that must happen before torch is imported."""
import os

# OpenMP threads busy-wait by default: with two processes on two cores (torchrun tests, a parallel job) a step
# becomes ~40x slower. A short spin keeps the idle speed and stays fast under contention.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
