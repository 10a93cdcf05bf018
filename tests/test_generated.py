"""The generated CUDA sources (cuda/inst/, cuda/attn/sm90_wgmma.inc) are what cuda/generate.py
writes from its one head-dim list: a stale or orphaned file fails CI."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_cuda_sources_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "cuda" / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
