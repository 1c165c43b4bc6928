"""launch/gpu_check.py on a machine without CUDA: one line, exit 0, nothing checked. (Its GPU flow runs only on a
CUDA machine, by hand; it is never part of this suite.)"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_without_cuda_it_says_it_needs_a_gpu_and_exits_0():
    # hiding every GPU makes this hold on a CUDA machine too
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "launch/gpu_check.py"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "gpu_check: needs a CUDA GPU (none found here); nothing checked\n"
