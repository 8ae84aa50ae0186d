"""Make the repository root importable (main, data, pruning) however pytest is started, and choose the
CPU threads as main.py's callers do (``main.run`` leaves them to its caller): one, which is what
``python main.py`` picks by itself for the small models the tests use, so that a run in this process
computes bit for bit what the same command computes in a fresh one."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)
