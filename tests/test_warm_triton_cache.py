"""The warm Triton cache (scripts/triton_cache.py, scripts/triton_warm.py), without a GPU.

* triton_key_for(RECORD) is triton_key() as Triton computes it (checked on this venv's own wheel), and
  refuses a wheel whose Python files differ;
* a fastres launch recorded from the triton backend's host code on fake CUDA tensors, compiled for sm_90a
  through the JIT's own argument specialisation, packed as the warm cache is (cubin + json, relative
  group) and installed into another cache folder, is a cache hit there (the logging cache manager sees
  miss, put, then hit), from a .tar.xz too; the recorded launches pass the tensors the host passes
  (an absent bias is the bf16 output, not an fp32 tensor: the pointer's type is in the key);
* the committed cache: its manifest and folders agree, it is small, and (when the Triton 3.6 venv of
  scripts/check_triton36.sh is here and the kernel sources are those it was built from) every key in
  it is the key the current sources give for the GPU machine's wheel;
* RESNET18_CASES are torchvision's ResNet-18 convs; build refuses a Triton that is not 3.6.0.
"""
import base64
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
COMMITTED = os.path.join(SCRIPTS, "triton-cache-sm90a.tar.xz")
VENV36 = os.path.join(ROOT, ".venv-triton36", "bin", "python")
sys.path.insert(0, SCRIPTS)
import triton_cache  # noqa: E402
import triton_warm  # noqa: E402


def _env(tmp_path, **extra):
    return dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=SCRIPTS, TRITON_CACHE_LOG=str(tmp_path / "cache.log"),
                TRITON_CACHE_MANAGER="triton_cache:LoggingFileCacheManager", **extra)


def _rehash(record, path):
    """record with `path`'s hash replaced by another (valid) sha256."""
    other = base64.urlsafe_b64encode(hashlib.sha256(path.encode()).digest()).rstrip(b"=").decode()
    return "\n".join(",".join([row.split(",")[0], f"sha256={other}"] + row.split(",")[2:])
                     if row.startswith(path + ",") else row for row in record.splitlines())


def test_triton_key_from_a_record_is_tritons_own():
    import triton.runtime.cache as rc
    record = triton_warm.local_record()
    assert triton_warm.triton_key_for(record) == rc.triton_key()
    files = triton_warm.record_hashes(record)
    lib = next(p for p in files if p.startswith("triton/_C/libtriton."))
    key = triton_warm.triton_key_for(_rehash(record, lib))     # another CPython build's libtriton
    assert key != rc.triton_key() and key.replace(triton_warm.record_hashes(_rehash(record, lib))[lib],
                                                  files[lib]) == rc.triton_key()
    py = next(p for p in files if p.startswith("triton/language/") and p.endswith(".py"))
    with pytest.raises(ValueError, match="files differ"):
        triton_warm.triton_key_for(_rehash(record, py))


HIT = textwrap.dedent("""
    import os, shutil, sys
    import triton_cache, triton_warm
    from triton.backends.compiler import GPUTarget
    tmp, target = sys.argv[1], GPUTarget("cuda", 90, 32)
    launches = triton_warm.capture(["resnet18"], [1], ["bf16"])
    conv = [s for lb, s in launches if s["kernel"].endswith(":_conv_kernel")]
    print("conv BIAS", sorted({s["args"][2]["ptr"] for s in conv}), "launches", len(launches))
    label, spec = next((lb, s) for lb, s in launches if s["kernel"].endswith(":_bwd_reduce_kernel"))
    first = os.path.join(tmp, "first")
    os.environ["TRITON_CACHE_DIR"] = first
    key = triton_warm.compile_spec(spec, target)           # miss, put
    triton_warm._keep_binary(first, key)                   # as a warm cache holds it
    open(os.path.join(first, "manifest.json"), "w").write('{"kernels": [{"dir": "%s"}]}' % key)
    triton_cache._pack(first, os.path.join(tmp, "warm.tar.xz"))
    for warm in (first, os.path.join(tmp, "warm.tar.xz")):
        dest = os.path.join(tmp, "run-" + os.path.basename(warm))
        assert triton_cache.install(warm, dest) == 1
        os.environ["TRITON_CACHE_DIR"] = dest
        assert triton_warm.compile_spec(spec, target) == key   # hit
        print(sorted(os.listdir(os.path.join(dest, key))))
    shutil.rmtree(first)
    print("key", key)
""")


def test_installed_warm_kernel_is_a_cache_hit(tmp_path):
    script = tmp_path / "hit.py"
    script.write_text(HIT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0 and "ptxas" in r.stderr.lower():
        pytest.skip(f"no usable ptxas for sm_90a here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    events = [line.split()[0] for line in (tmp_path / "cache.log").read_text().splitlines()]
    assert events == ["miss", "put", "hit", "hit"]
    assert "'_bwd_reduce_kernel.cubin', '_bwd_reduce_kernel.json'" in r.stdout     # nothing but what a hit reads
    assert "conv BIAS ['bf16'] " in r.stdout   # no bias: the host passes the bf16 output there
    key = r.stdout.split()[-1]
    counts, saved = triton_cache.stats(str(tmp_path / "cache.log"), str(tmp_path / "warm.tar.xz"))
    assert counts == {"hit": 2, "miss": 1, "put": 1} and saved == 1
    with open(tmp_path / f"run-warm.tar.xz/{key}/__grp___bwd_reduce_kernel.json") as f:
        assert all(p.startswith(str(tmp_path)) for p in json.load(f)["child_paths"].values())


def _committed():
    if not os.path.exists(COMMITTED):
        pytest.skip(f"no committed warm cache at {COMMITTED}")
    with tarfile.open(COMMITTED, "r:xz") as t:
        names = t.getnames()
        man = json.load(t.extractfile("manifest.json"))
    return man, names


def test_committed_cache_is_whole_and_small():
    man, names = _committed()
    assert os.path.getsize(COMMITTED) < 20 * 2 ** 20
    assert names[0] == "manifest.json" and man["triton"] == "3.6.0" and man["arch"] == "sm_90a"
    assert man["wheel_tag"] == "cp312" and f"RECORD-{man['wheel_tag']}" in names
    dirs = {k["dir"] for k in man["kernels"]}
    assert len(dirs) == len(man["kernels"]) > 100
    assert {n.split("/")[0] for n in names if "/" in n} == dirs
    for d in dirs:
        files = sorted(n.split("/")[1] for n in names if n.startswith(d + "/"))
        assert len(files) == 3 and files[0].startswith("__grp__") and files[1].endswith(".cubin"), files


def test_committed_cache_keys_are_the_current_sources(tmp_path):
    man, _ = _committed()
    stale = [rel for rel, sha in man["sources"].items()
             if hashlib.sha256(open(os.path.join(ROOT, rel), "rb").read()).hexdigest() != sha]
    if stale:
        pytest.skip(f"warm cache stale ({', '.join(stale)} changed): rebuild it with "
                    f"scripts/triton_cache.py build {os.path.relpath(COMMITTED, ROOT)} in .venv-triton36")
    probe = subprocess.run([VENV36, "-c", "import triton; assert triton.__version__ == '3.6.0'"],
                           capture_output=True) if os.path.exists(VENV36) else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no Triton 3.6 venv (scripts/check_triton36.sh makes .venv-triton36)")
    code = textwrap.dedent(f"""
        import json, tarfile, triton.runtime.cache as rc, triton_warm
        from triton.backends.compiler import GPUTarget
        with tarfile.open({COMMITTED!r}, "r:xz") as t:
            record = t.extractfile("RECORD-cp312").read().decode()
            man = json.load(t.extractfile("manifest.json"))
        key = triton_warm.triton_key_for(record)
        rc.triton_key = lambda: key
        target = GPUTarget("cuda", man["target"]["arch"], 32)
        bad = [k["first"] for k in man["kernels"] if triton_warm.prepare(k["spec"], target)[2] != k["dir"]]
        print(len(man["kernels"]), "kernels,", len(bad), "keys differ", bad[:3])
    """)
    r = subprocess.run([VENV36, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert " 0 keys differ" in r.stdout, r.stdout


def test_resnet18_cases_are_torchvisions_convs():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    seen = set()

    def hook(mod, args):
        x = args[0]
        seen.add((mod.in_channels, x.shape[2], mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0]))
    model = tv.models.resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(hook)
    with torch.device("meta"):
        model.to("meta")(torch.empty(1, 3, 224, 224))
    assert seen == {(c["cin"], c["h"], c["cout"], c["kh"], c["stride"], c["pad"]) for c in triton_warm.RESNET18_CASES}


def test_build_needs_triton_3_6(tmp_path):
    import triton
    if triton.__version__ == triton_warm.WANT_TRITON:
        pytest.skip("this is Triton 3.6.0")
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "triton_cache.py"), "build", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "needs triton 3.6.0" in r.stderr, r.stderr
