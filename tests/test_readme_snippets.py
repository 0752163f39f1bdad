"""Every ```python block of README.md runs as written on this machine (a CPU is enough).

A block whose first line, or a line, carries the comment ``# needs a GPU`` is skipped (the block) or
dropped (the line) when no CUDA GPU is available.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_MARK = "# needs a GPU"


def python_blocks(text: str):
    """(first line number, code) of every ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return out


with open(os.path.join(ROOT, "README.md")) as f:
    BLOCKS = python_blocks(f.read())


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3
    assert python_blocks("x\n```python\nprint(1)\n```\n") == [(3, "print(1)\n")]


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path):
    lines = code.splitlines()
    if not torch.cuda.is_available():
        if lines and GPU_MARK in lines[0]:
            pytest.skip(f"README.md:{line} is marked '{GPU_MARK}' and there is no CUDA GPU here")
        code = "\n".join(ln for ln in lines if GPU_MARK not in ln) + "\n"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"README.md:{line} failed:\n{code}\n{r.stderr[-3000:]}"
