"""scripts/triton_cache.py: a compile for sm_90a (no GPU needed) is stored, and a second lookup of the same
source and target from another process hits the cache; the logging cache manager counts both."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)
import triton_cache  # noqa: E402

COMPILE = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def add_one(X, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1.0, mask=offs < n)

    src = ASTSource(add_one, {"X": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128},
                    {(0,): [["tt.divisibility", 16]]})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    print("compiled", k.hash, "sm_90a" in k.asm["ptx"])
""")


def _compile(tmp_path, env_extra=None):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_CACHE_LOG=str(tmp_path / "cache.log"), PYTHONPATH=SCRIPTS,
               TRITON_CACHE_MANAGER="triton_cache:LoggingFileCacheManager", **(env_extra or {}))
    script = tmp_path / "compile_add_one.py"  # (a file: @triton.jit reads its function's source)
    script.write_text(COMPILE)
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)


def test_same_source_and_target_hit_the_cache(tmp_path):
    first = _compile(tmp_path)
    if first.returncode != 0 and "ptxas" in first.stderr.lower():
        pytest.skip(f"no usable ptxas for sm_90a here: {first.stderr[-300:]}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _compile(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert first.stdout == second.stdout and first.stdout.split()[2] == "True"  # same hash, PTX for sm_90a
    events = [line.split()[0] for line in (tmp_path / "cache.log").read_text().splitlines()]
    assert events == ["miss", "put", "hit"]
    (counts, saved) = triton_cache.stats(str(tmp_path / "cache.log"), str(tmp_path / "cache"))
    assert counts == {"hit": 1, "miss": 1, "put": 1} and saved == 1
