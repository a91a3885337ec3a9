"""Shared test setup: the repository root on sys.path, a single CPU thread pool per test process."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# One intra-op thread: on a shared 2-core machine, thread contention makes small-tensor tests far slower.
torch.set_num_threads(1)
