"""Building and checking a warm Triton cache on a CPU: the launches / build / verify half of
scripts/triton_cache.py (its CLI runs them, its docstring says what they do); the GPU-run half (logging
manager, install, stats) stays there, light. The launches are recorded from the triton backend's own
host code on fake CUDA tensors (capture), not from kernels/report_variants.py: the report describes
pointers that a launch leaves unused by their nominal type (an absent bias as *fp32), while the host
passes another tensor there (the output, bf16), and the pointer's type is part of the cache key.

Why the key needs care (Triton 3.6, triton/runtime/cache.py): get_cache_key = triton_key() + the
source's hash + backend.hash() (`ptxas --version` + arch) + options.hash() + the cache-invalidating env
vars; triton_key() is the version + sha256 of runtime/cache.py, of every module under compiler/ and
backends/, of _C/libtriton.so's bytes and of every module under language/. Of the cp311 and cp312 wheels
of triton 3.6.0 only the compiled .so files differ (their RECORDs), so triton_key_for() rebuilds the
cp312 key from the cp312 RECORD; `verify` under the cp312 wheel checks the compiled cubins are the same.
"""
import base64
import csv
import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from triton_cache import ROOT, _manifest, _pack, _sha256, forget, install, warm_folder

WANT_TRITON = "3.6.0"
# The ResNet-18 conv shapes at 224 px (n: a placeholder, build sets the batch), as report.RESNET50_CASES.
RESNET18_CASES = [dict(name=nm, n=256, cin=ci, h=hw, w=hw, cout=co, kh=k, kw=k, stride=s, pad=k // 2)
                  for nm, ci, hw, co, k, s in (
                      ("stem", 3, 224, 64, 7, 2), ("l1.3x3.64", 64, 56, 64, 3, 1),
                      ("l2.3x3.64-128/2", 64, 56, 128, 3, 2), ("l2.down.64-128/2", 64, 56, 128, 1, 2),
                      ("l2.3x3.128", 128, 28, 128, 3, 1), ("l3.3x3.128-256/2", 128, 28, 256, 3, 2),
                      ("l3.down.128-256/2", 128, 28, 256, 1, 2), ("l3.3x3.256", 256, 14, 256, 3, 1),
                      ("l4.3x3.256-512/2", 256, 14, 512, 3, 2), ("l4.down.256-512/2", 256, 14, 512, 1, 2),
                      ("l4.3x3.512", 512, 7, 512, 3, 1))]
# Triton's names of the tensor dtypes a capture records -> torch's
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "u8": "uint8", "i32": "int32", "i64": "int64"}


def record_hashes(text):
    """{path: sha256 hex} from a wheel's RECORD text (entries without a hash are left out)."""
    out = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[1].startswith("sha256="):
            b64 = row[1][len("sha256="):]
            out[row[0]] = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return out


def read_record(path):
    """RECORD text of a .whl file, or of a RECORD file itself."""
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
            return z.read(name).decode()
    with open(path) as f:
        return f.read()


def local_record():
    from importlib import metadata
    return metadata.distribution("triton").read_text("RECORD")


def _key_files():
    """The files triton_key() hashes, in its order, relative to site-packages: the same walk as
    triton/runtime/cache.py triton_key() (cache.py, compiler/, backends/, _C/libtriton, language/)."""
    import pkgutil
    import sysconfig

    import triton.runtime.cache as rc
    tp = os.path.dirname(os.path.dirname(os.path.abspath(rc.__file__)))
    paths = [os.path.abspath(rc.__file__)]
    for sub in ("compiler", "backends"):
        paths += [lib.module_finder.find_spec(lib.name).origin
                  for lib in pkgutil.walk_packages([os.path.join(tp, sub)], prefix=f"triton.{sub}.")]
    paths.append(os.path.join(tp, "_C", f"libtriton.{sysconfig.get_config_var('EXT_SUFFIX').split('.')[-1]}"))
    paths += [lib.module_finder.find_spec(lib.name).origin
              for lib in pkgutil.walk_packages([os.path.join(tp, "language")], prefix="triton.language.")]
    site = os.path.dirname(tp)
    return [os.path.relpath(p, site).replace(os.sep, "/") for p in paths]


# files of two CPython builds of one Triton wheel that may differ (compiled against each Python)
_PER_PYTHON = ("triton/_C/libtriton.so", "triton/_C/libproton.so")


def triton_key_for(record_text):
    """triton_key() as the Triton install described by `record_text` (its wheel's RECORD) computes it.
    Every file of that wheel must hash as the same file here, except the per-Python binaries."""
    import triton
    theirs, ours = record_hashes(record_text), record_hashes(local_record())
    differ = sorted(p for p in set(theirs) | set(ours) if theirs.get(p) != ours.get(p) and p not in _PER_PYTHON
                    and p.startswith("triton/") and not p.startswith("triton/instrumentation/"))
    if differ:
        raise ValueError(f"the target wheel is not this Triton {triton.__version__} built for another "
                         f"Python: {len(differ)} files differ, e.g. {differ[:3]}")
    return triton.__version__ + "-".join(theirs[p] for p in _key_files())


# ---- the launches and their compiles ---------------------------------------------------------------

def _import_kernels():
    """fastres.kernels from this checkout's kernels/: the one imported already when it is that (a capture
    imports the whole fastres), else through a package root mapping it there, as setup.py's package_dir
    (a copy elsewhere, such as the one scripts/check_triton36.sh puts on its venv's path, is not used)."""
    want = os.path.realpath(os.path.join(ROOT, "kernels"))
    mod = sys.modules.get("fastres.kernels")
    if mod is not None and os.path.dirname(os.path.realpath(mod.__file__)) == want:
        return
    for m in [m for m in sys.modules if m == "fastres" or m.startswith("fastres.")]:
        del sys.modules[m]
    root = tempfile.mkdtemp(prefix="fastres-pkgroot-")
    os.makedirs(os.path.join(root, "fastres"))
    open(os.path.join(root, "fastres", "__init__.py"), "w").close()
    os.symlink(want, os.path.join(root, "fastres", "kernels"))
    sys.path.insert(0, root)
    import fastres.kernels  # noqa: F401


def capture(archs, batches, dtypes):
    """[(label, spec)]: every Triton launch the triton backend's functions (fastres/backends/triton.py)
    make for each conv of `archs` (report.RESNET50_CASES, RESNET18_CASES) at each batch size and dtype
    (bf16: autocast's operands; BatchNorm parameters fp32): training forward + backward and eval forward,
    each with a residual + ReLU, ReLU only, and neither (the block's last conv, the others, downsample).
    They run on fake CUDA tensors (FakeTensorMode: needs a torch built with CUDA, no GPU); each launch
    Triton's JIT receives is recorded instead of compiled, every config the conv's autotuner would time
    included. A spec is JSON: kernel ("module:name"), args (one per kernel argument, as launched:
    {"ptr": dtype, "aligned": bool} for a tensor), options (num_warps, num_stages, ...)."""
    import contextlib
    from unittest import mock

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from fastres.backends import triton as tb
    from fastres.kernels import report
    from fastres.kernels.shapes import conv_out_hw
    if not torch.backends.cuda.is_built():
        raise RuntimeError("capture: this torch has no CUDA (fake CUDA tensors need one): use the main venv")
    out, label, short = [], [""], {v: k for k, v in TORCH_DTYPES.items()}

    def run(fn, *args, grid, warmup, **kwargs):
        vals = dict(zip(fn.arg_names, args), **{k: v for k, v in kwargs.items() if k in fn.arg_names})
        spec = [{"ptr": short[str(v.dtype).split(".")[-1]], "aligned": v.storage_offset() * v.element_size() % 16
                 == 0} if isinstance(v, torch.Tensor) else v for v in (vals[a] for a in fn.arg_names)]
        opts = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
        out.append((label[0], dict(kernel=f"{fn.fn.__module__}:{fn.__name__}", args=spec, options=opts)))

    def bench(tuner, *args, config, **meta):
        tuner.fn.run(*args, **dict(meta, **config.all_kwargs()))
        return [1.0, 1.0, 1.0]

    tune = Autotuner.run

    def tune_all(tuner, *args, **kwargs):  # every launch tunes: all pruned configs recorded
        tuner.cache.clear()
        return tune(tuner, *args, **kwargs)
    cases = {"resnet50": report.RESNET50_CASES, "resnet18": RESNET18_CASES}
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    with mock.patch.object(JITFunction, "run", run), mock.patch.object(Autotuner, "_bench", bench), \
            mock.patch.object(Autotuner, "run", tune_all), \
            mock.patch.object(torch.cuda, "device", lambda d: contextlib.nullcontext()), \
            FakeTensorMode(allow_non_fake_inputs=True):
        for arch in archs:
            for c in cases[arch]:
                for n in batches:
                    for dt in dtypes:
                        d, f, cl = tdt[dt], dict(device="cuda", dtype=torch.float32), torch.channels_last
                        x = torch.empty(n, c["cin"], c["h"], c["w"], device="cuda", dtype=d).to(memory_format=cl)
                        w = torch.empty(c["cout"], c["cin"], c["kh"], c["kw"], device="cuda", dtype=d)
                        w = w.to(memory_format=cl)
                        bn = [torch.empty(c["cout"], **f) for _ in range(4)]
                        geo = ([c["stride"]] * 2, [c["pad"]] * 2, [1, 1], 1)
                        ho, wo = conv_out_hw(c["h"], c["w"], c["kh"], c["kw"], geo[0], geo[1])
                        for res, relu in ((True, True), (False, True), (False, False)):
                            label[0] = f"{arch} b{n} {dt} {c['name']} {'res+' * res}{'relu' if relu else 'plain'}"
                            r = torch.empty(n, c["cout"], ho, wo, device="cuda", dtype=d).to(memory_format=cl) \
                                if res else None
                            y, z, mean, invstd, mask = tb.conv_bn_act_forward(x, w, None, *bn, r, *geo, True, 0.1,
                                                                              1e-5, relu, relu)
                            tb.conv_bn_act_backward(torch.empty_like(y), x, w, None, z, mask, mean, invstd, bn[0],
                                                    *geo, True, relu, [True, True, False, True, True, res])
                            tb.conv_bn_act_forward(x, w, None, *bn, r, *geo, False, 0.1, 1e-5, relu, False)
    return out


class _Dtype(str):
    """A torch dtype as Triton's argument specialiser reads it (its str), without torch."""


_DTYPES = {}


def _ptr(name, aligned):
    """A tensor argument as the specialiser reads it: dtype and data_ptr (16-byte aligned or not); one
    dtype object per name, kept alive (the specialiser remembers dtypes by object identity)."""
    from triton.runtime.jit import MockTensor
    t = MockTensor(_DTYPES.setdefault(name, _Dtype(f"torch.{TORCH_DTYPES[name]}")))
    t.data_ptr = lambda: 0 if aligned else 8
    return t


def prepare(spec, target):
    """(ASTSource, options, key folder) of a spec: what JITFunction.run hands to triton.compile."""
    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.cache import get_cache_key
    from triton.runtime.jit import create_function_from_signature
    mod, name = spec["kernel"].split(":")
    _import_kernels()
    fn = getattr(importlib.import_module(mod), name)
    backend = make_backend(target)
    args = [_ptr(a["ptr"], a["aligned"]) if isinstance(a, dict) else a for a in spec["args"]]
    kw = dict(spec["options"], debug=fn.debug or knobs.runtime.debug,
              instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, opts)
    src = ASTSource(fn, signature, constexprs, attrs)
    h = hashlib.sha256(get_cache_key(src, backend, options, get_cache_invalidating_env_vars()).encode()).hexdigest()
    return src, options, base64.b32encode(bytes.fromhex(h)).decode().rstrip("=")


def compile_spec(spec, target):
    """Compile a spec into TRITON_CACHE_DIR (a hit when it is there); returns its key folder."""
    import triton
    src, options, key = prepare(spec, target)
    triton.compile(src, target=target, options=options.__dict__)
    return key


def _compile_job(job):
    spec, arch = job
    from triton.backends.compiler import GPUTarget
    return compile_spec(spec, GPUTarget("cuda", arch, 32))


def _keep_binary(cache, key):
    """Leave in cache/key only what a hit reads (KERNEL.json, KERNEL.cubin, the group), paths relative."""
    folder = os.path.join(cache, key)
    grp = next(n for n in os.listdir(folder) if n.startswith("__grp__"))
    name = grp[len("__grp__"):-len(".json")]
    keep = {f"{name}.json", f"{name}.cubin"}
    for n in os.listdir(folder):
        if n != grp and n not in keep:
            shutil.rmtree(os.path.join(folder, n)) if os.path.isdir(os.path.join(folder, n)) \
                else os.remove(os.path.join(folder, n))
    if not all(os.path.exists(os.path.join(folder, n)) for n in keep):
        raise RuntimeError(f"{key}: no {sorted(keep)} after compiling")
    with open(os.path.join(folder, grp), "w") as f:
        json.dump({"child_paths": {n: n for n in sorted(keep)}}, f)


def _target_record(old, tag, py, wheel):
    """RECORD text of the Triton wheel built for Python `py` ("3.12"): --wheel, the copy an earlier
    build kept in the cache `old`, or `pip download` (network)."""
    kept = os.path.join(old, f"RECORD-{tag}") if old else ""
    if wheel:
        return read_record(wheel)
    if kept and os.path.exists(kept):
        return read_record(kept)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "download", f"triton=={WANT_TRITON}", "--python-version", py,
                        "--only-binary=:all:", "--no-deps", "-q", "-d", d], check=True)
        return read_record(os.path.join(d, next(n for n in os.listdir(d) if n.endswith(".whl"))))


def _captured(archs, batches, dtypes, python):
    """capture() run by `python` (a torch with CUDA: the main venv's), as [(label, spec)]."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [python, os.path.join(ROOT, "scripts", "triton_cache.py"), "launches", os.path.join(d, "l.json"),
               "--archs", ",".join(archs), "--batches", ",".join(map(str, batches)), "--dtypes", ",".join(dtypes)]
        subprocess.run(cmd, check=True, env=dict(os.environ, TRITON_INTERPRET="0"))
        with open(os.path.join(d, "l.json")) as f:
            return [tuple(x) for x in json.load(f)]


def build(out, arch, dtypes, archs, batches, py, wheel, jobs, capture_python):
    """Compile the launches into the warm cache `out` (a folder, or a .tar.xz), replacing what was there;
    the kernels of an earlier build there are cache hits (a rebuild compiles only what changed)."""
    os.environ.update(TRITON_INTERPRET="0", TRITON_STORE_BINARY_ONLY="1")  # (not in the key: IRs unwritten)
    import triton
    if triton.__version__ != WANT_TRITON:
        sys.exit(f"triton_cache build: needs triton {WANT_TRITON} (the GPU machines'), this is "
                 f"{triton.__version__}: run it in .venv-triton36 (scripts/check_triton36.sh makes it)")
    from concurrent.futures import ProcessPoolExecutor

    import triton.runtime.cache as rc
    from triton.backends.compiler import GPUTarget
    t0 = time.time()
    tag = f"cp{py.replace('.', '')}"
    old = warm_folder(out) if os.path.exists(out) else ""
    record = _target_record(old, tag, py, wheel) if py != "%d.%d" % sys.version_info[:2] else local_record()
    key = triton_key_for(record)
    rc.triton_key = lambda: key  # get_cache_key (runtime/cache.py) reads it from this module
    listed = _captured(archs, batches, dtypes, capture_python)
    target = GPUTarget("cuda", arch, 32)
    work = tempfile.mkdtemp(prefix="triton-build-")
    os.environ["TRITON_CACHE_DIR"] = work
    if old:
        install(out, work, warn=False)
    uniq = {}
    for label, spec in listed:
        uniq.setdefault(prepare(spec, target)[2], (spec, []))[1].append(label)
    print(f"triton_cache build: {len(listed)} launches, {len(uniq)} distinct kernels for sm_{arch}a, "
          f"triton {triton.__version__} {tag}; compiling on {jobs} processes", flush=True)
    with ProcessPoolExecutor(jobs) as pool:  # (forked: the workers keep the patched triton_key)
        for i, k in enumerate(pool.map(_compile_job, [(s, arch) for s, _ in uniq.values()]), 1):
            if k not in uniq:
                raise RuntimeError(f"a compile stored key {k}, not the key computed beforehand")
            if i % 50 == 0 or i == len(uniq):
                print(f"  {i}/{len(uniq)} compiled, {time.time() - t0:.0f} s", flush=True)
    new = tempfile.mkdtemp(prefix="triton-warm-")
    for k in uniq:
        _keep_binary(work, k)
        shutil.move(os.path.join(work, k), os.path.join(new, k))
    shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(new, f"RECORD-{tag}"), "w") as f:
        f.write(record)
    sources = sorted({os.path.realpath(sys.modules[s["kernel"].split(":")[0]].__file__) for s, _ in uniq.values()})
    man = dict(triton=triton.__version__, wheel_tag=tag, arch=f"sm_{arch}a" if arch >= 90 else f"sm_{arch}",
               target=dict(backend="cuda", arch=arch, warp_size=32), archs=archs, batches=batches, dtypes=dtypes,
               triton_key_sha256=hashlib.sha256(key.encode()).hexdigest(), launches=len(listed),
               sources={os.path.relpath(p, ROOT): _sha256(p) for p in sources},
               build_s=round(time.time() - t0),
               kernels=[dict(dir=k, launches=len(labels), first=labels[0], spec=s) for k, (s, labels) in uniq.items()])
    with open(os.path.join(new, "manifest.json"), "w") as f:
        json.dump(man, f, indent=0)
    raw = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(new) for n in ns)
    if out.endswith(".tar.xz"):
        _pack(new, out)
        shutil.rmtree(new)
    else:
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(new, out)
    size = os.path.getsize(out) if out.endswith(".tar.xz") else raw
    print(f"triton_cache build: {len(uniq)} kernels in {out}: {size / 2 ** 20:.1f} MiB ({raw / 2 ** 20:.1f} MiB "
          f"unpacked), {time.time() - t0:.0f} s")
    return man


def _code(cubin):
    """The sections of a cubin (ELF64) other than debug info (which holds the source files' paths)."""
    with open(cubin, "rb") as f:
        elf = f.read()
    off, size, num, names = (int.from_bytes(elf[a:a + n], "little") for a, n in ((0x28, 8), (0x3A, 2), (0x3C, 2),
                                                                                 (0x3E, 2)))
    heads = [elf[off + i * size:off + (i + 1) * size] for i in range(num)]
    field = lambda h, a, n: int.from_bytes(h[a:a + n], "little")  # noqa: E731
    strtab = heads[names]
    strtab = elf[field(strtab, 24, 8):field(strtab, 24, 8) + field(strtab, 32, 8)]
    out = {}
    for h in heads:
        name = strtab[field(h, 0, 4):strtab.index(b"\0", field(h, 0, 4))].decode()
        if "debug" not in name and field(h, 4, 4) != 8:  # (8: NOBITS, no bytes)
            out[name] = elf[field(h, 24, 8):field(h, 24, 8) + field(h, 32, 8)]
    return out


def verify(warm, limit):
    """Recompile `limit` kernels of the manifest (evenly spread; 0: all) with this Python's own Triton key
    into a fresh cache; their key folders and cubins must be the warm cache's. Returns the mismatches."""
    os.environ.update(TRITON_INTERPRET="0", TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton-verify-"))
    import triton
    from triton.backends.compiler import GPUTarget
    man, folder = _manifest(warm), warm_folder(warm)
    if man["triton"] != triton.__version__:
        sys.exit(f"triton_cache verify: the cache is for triton {man['triton']}, this is {triton.__version__}")
    ks = man["kernels"]
    picked = ks if not limit or limit >= len(ks) else [ks[i * len(ks) // limit] for i in range(limit)]
    bad, same = [], 0
    for k in picked:
        key = compile_spec(k["spec"], GPUTarget("cuda", man["target"]["arch"], 32))
        cubin = next(n for n in os.listdir(os.path.join(folder, k["dir"])) if n.endswith(".cubin"))
        mine, theirs = os.path.join(os.environ["TRITON_CACHE_DIR"], key, cubin), os.path.join(folder, k["dir"], cubin)
        if key != k["dir"] or not os.path.exists(mine) or _code(mine) != _code(theirs):
            bad.append(k["first"])
        same += key == k["dir"] and os.path.exists(mine) and _sha256(mine) == _sha256(theirs)
    forget(warm)
    print(f"triton_cache verify: {len(picked) - len(bad)}/{len(picked)} kernels have the same key folder and the "
          f"same code (cubin sections but debug info, which names the source paths; {same} whole cubins "
          f"equal), python {sys.version.split()[0]}, triton {triton.__version__}"
          + (f"; differ: {bad[:5]}" if bad else ""))
    return bad
