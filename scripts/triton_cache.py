"""Triton's compile cache on a GPU run: a warm cache built on a CPU, which lookups hit, what it saved.

    python scripts/triton_cache.py build OUT [--arch sm_90a] [--dtypes bf16,fp32] [--archs resnet50,resnet18]
                                   [--batches 1,32,64,256] [--python 3.12] [--wheel WHEEL_OR_RECORD] [--jobs 2]
                                   [--capture-python .venv/bin/python]
      e.g. .venv-triton36/bin/python scripts/triton_cache.py build scripts/triton-cache-sm90a.tar.xz
    python scripts/triton_cache.py launches OUT.json [--dtypes ...] [--archs ...] [--batches ...]
    python scripts/triton_cache.py install WARM CACHE_DIR       (no Triton needed)
    python scripts/triton_cache.py verify WARM [--limit N]      (any Python with the same Triton)
    TRITON_CACHE_MANAGER=triton_cache:LoggingFileCacheManager TRITON_CACHE_LOG=FILE   (scripts/ on PYTHONPATH)
    python scripts/triton_cache.py stats --log FILE [--warm WARM]

build (scripts/triton_warm.py; run it in the Triton 3.6 venv of scripts/check_triton36.sh: Triton must be
3.6.0, the GPU machines' version) compiles with no GPU every Triton launch the triton backend makes for
the ResNet-50/18 convs at the given batch sizes and dtypes (training step and eval; every config the
conv's autotuner times), recorded by `launches` from the backend's own host code on fake CUDA tensors
(run by --capture-python: a torch with CUDA, the main venv's), each through Triton's own JIT argument
specialisation and triton.compile, so each key is the one a GPU launch computes; for the GPU machine's
Python (--python): triton_key() hashes libtriton.so, which differs between the cp311 and cp312 wheels,
so the key is computed from the target wheel's RECORD (see triton_warm.py). Only what a hit reads is
kept (KERNEL.json, KERNEL.cubin, the group file with relative paths), with manifest.json (each kernel's
launch, the hashed kernel sources) and the target RECORD; OUT is a folder or a .tar.xz of one (cubins
compress ~15x). verify, run under the target Python and wheel, recompiles kernels with Triton's own key
and checks that key folders and code match.

install copies a warm cache (folder or .tar.xz) into CACHE_DIR (the run's TRITON_CACHE_DIR) with the
group files' absolute paths (what FileCacheManager.get_group checks) and warns when a kernel source
changed since the build, the Python is not the one built for, or an env var that enters the key is set.
LoggingFileCacheManager is Triton's FileCacheManager that appends one line per kernel lookup
("hit KEY NAME" / "miss KEY NAME") and per stored kernel ("put KEY NAME") to TRITON_CACHE_LOG; every
process of a run appends to the same file; TRITON_CACHE_MANAGER does not enter Triton's cache key.
stats counts lookups, hits, compiles, and the hits whose KEY is a kernel of the warm cache: compiles
the warm cache saved.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile

if __name__ == "__main__":  # the CLI imports Triton only where a subcommand needs it
    FileCacheManager = object
else:  # imported by Triton inside every process of a GPU run
    from triton.runtime.cache import FileCacheManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Env vars that change Triton's cache key or its options (libtriton's get_cache_invalidating_env_vars,
# knobs read by CUDAOptions / parse_options / JITFunction.run); build drops them, install warns.
KEY_ENV = ("TRITON_DEFAULT_FP_FUSION", "TRITON_OVERRIDE_ARCH", "TRITON_DISABLE_LINE_INFO", "TRITON_ENABLE_ASAN",
           "TRITON_ENABLE_LLVM_DEBUG", "TRITON_LLVM_DEBUG_ONLY", "TRITON_ENABLE_EXPERIMENTAL_CONSAN",
           "TRITON_DEBUG", "TRITON_INSTRUMENTATION_MODE", "TRITON_PTXAS_PATH", "PTXAS_OPTIONS",
           "TRITON_LIBDEVICE_PATH", "TRITON_ALWAYS_COMPILE", "DISABLE_LLVM_OPT", "DISABLE_PTXAS_OPT",
           "MLIR_ENABLE_DUMP", "LLVM_IR_ENABLE_DUMP", "NVPTX_ENABLE_DUMP", "MLIR_ENABLE_TIMING",
           "LLVM_ENABLE_TIMING", "MLIR_ENABLE_DIAGNOSTICS", "USE_IR_LOC", "TRITON_REPRODUCER_PATH")


def _log(event, key, name):
    path = os.environ.get("TRITON_CACHE_LOG")
    if path:
        with open(path, "a") as f:  # one short write per line: lines of parallel processes do not mix
            f.write(f"{event} {key} {name}\n")


class LoggingFileCacheManager(FileCacheManager):
    """FileCacheManager that logs kernel lookups (get_group) and stores (put_group)."""

    def get_group(self, filename):
        group = super().get_group(filename)
        if filename.endswith(".json"):
            _log("hit" if group and filename in group else "miss", self.key, filename)
        return group

    def put_group(self, filename, group):
        if filename.endswith(".json"):
            _log("put", self.key, filename)
        return super().put_group(filename, group)


def warm_folder(warm):
    """A warm cache as a folder: `warm` itself, or a .tar.xz of one unpacked into a temporary folder."""
    if not warm.endswith(".tar.xz") or not os.path.isfile(warm):
        return warm
    if warm not in _UNPACKED:
        _UNPACKED[warm] = tempfile.mkdtemp(prefix="triton-warm-")
        with tarfile.open(warm, "r:xz") as t:
            t.extractall(_UNPACKED[warm], filter="data")
    return _UNPACKED[warm]


_UNPACKED = {}


def forget(warm):
    """Remove the temporary folder a .tar.xz warm cache was unpacked into (if any)."""
    if warm in _UNPACKED:
        shutil.rmtree(_UNPACKED.pop(warm), ignore_errors=True)


def _pack(folder, out):
    """folder -> out.tar.xz, manifest.json first (stats reads only it), the same bytes for the same files."""
    names = ["manifest.json"] + sorted(n for n in os.listdir(folder) if n != "manifest.json")

    def plain(info):
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w:xz", preset=9) as t:
        for n in names:
            t.add(os.path.join(folder, n), arcname=n, filter=plain, recursive=False)
            if os.path.isdir(os.path.join(folder, n)):
                for m in sorted(os.listdir(os.path.join(folder, n))):
                    t.add(os.path.join(folder, n, m), arcname=f"{n}/{m}", filter=plain)
    os.replace(tmp, out)


def _manifest(warm):
    """manifest.json of a warm cache, None for a plain cache folder (read first from a .tar.xz)."""
    if warm.endswith(".tar.xz") and warm not in _UNPACKED:
        with tarfile.open(warm, "r:xz") as t:
            first = t.next()
            return json.load(t.extractfile(first)) if first.name == "manifest.json" else None
    path = os.path.join(warm_folder(warm), "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def warm_keys(warm):
    """The kernel folders of a warm cache (its manifest's, or every sub-folder of a plain cache dir)."""
    man = _manifest(warm)
    if man is not None:
        return {k["dir"] for k in man["kernels"]}
    folder = warm_folder(warm)
    return {d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))}


def stats(log, warm):
    counts = {"hit": 0, "miss": 0, "put": 0}
    keys = warm_keys(warm) if warm and os.path.exists(warm) else set()
    saved = set()
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] in counts:
                    counts[parts[0]] += 1
                    if parts[0] == "hit" and parts[1] in keys:
                        saved.add(parts[1])
    print(f"triton cache: {counts['hit'] + counts['miss']} kernel lookups, {counts['hit']} hits, "
          f"{counts['put']} compiles")
    if warm:
        print(f"warm cache {warm}: {len(keys)} kernels, {len(saved)} of them used "
              f"(compiles saved: {len(saved)})" if keys else f"warm cache {warm}: none")
    return counts, len(saved)


# ---- install: a warm cache into a run's TRITON_CACHE_DIR (no Triton) -------------------------------

def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def install(warm, dest, warn=True):
    """Copy the kernels of `warm` into `dest`, group files pointing at `dest`; returns how many.
    warn: say what would make its lookups miss here (changed sources, another Python, key env vars)."""
    if not os.path.exists(warm):
        print(f"warm cache {warm}: not there, nothing installed")
        return 0
    dest, folder = os.path.abspath(dest), warm_folder(warm)
    keys = sorted(warm_keys(warm))
    for key in keys:
        shutil.copytree(os.path.join(folder, key), os.path.join(dest, key), dirs_exist_ok=True)
        for name in os.listdir(os.path.join(dest, key)):
            if name.startswith("__grp__"):
                path = os.path.join(dest, key, name)
                with open(path) as f:
                    children = json.load(f)["child_paths"]
                with open(path, "w") as f:
                    json.dump({"child_paths": {c: os.path.join(dest, key, c) for c in children}}, f)
    man = _manifest(warm) or {}
    print(f"warm cache {warm}: {len(keys)} kernels (triton {man.get('triton', '?')} {man.get('wheel_tag', '?')}, "
          f"{man.get('arch', '?')}) installed into {dest}")
    if not warn:
        forget(warm)
        return len(keys)
    changed = [rel for rel, sha in man.get("sources", {}).items()
               if not os.path.exists(os.path.join(ROOT, rel)) or _sha256(os.path.join(ROOT, rel)) != sha]
    if changed:
        print(f"warm cache: STALE, {', '.join(changed)} changed since the build: its kernels will miss "
              f"(rebuild: scripts/triton_cache.py build {warm})")
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    if man.get("wheel_tag") and man["wheel_tag"] != tag:
        print(f"warm cache: built for {man['wheel_tag']}'s Triton wheel, this Python is {tag}: no lookup will hit")
    env = [v for v in KEY_ENV if os.environ.get(v)]
    if env:
        print(f"warm cache: {', '.join(env)} set here: they enter Triton's cache key or options, lookups may miss")
    forget(warm)
    return len(keys)


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    ap = _Parser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="count lookups, hits, compiles and warm-cache savings of a run's log")
    st.add_argument("--log", required=True)
    st.add_argument("--warm", default="")
    sel = argparse.ArgumentParser(add_help=False)
    sel.add_argument("--dtypes", default="bf16,fp32")
    sel.add_argument("--archs", default="resnet50,resnet18")
    sel.add_argument("--batches", default="1,32,64,256", help="benchmarked: models 1/32/256, ops and blocks 64")
    bd = sub.add_parser("build", parents=[sel], help="compile the ResNet launches into a warm cache (no GPU)")
    bd.add_argument("out")
    bd.add_argument("--arch", default="sm_90a", help="sm_90a (default) or sm_80")
    bd.add_argument("--python", default="3.12", help="the GPU machine's Python, whose Triton wheel keys the cache")
    bd.add_argument("--wheel", default="", help="that Triton wheel (.whl) or its RECORD (default: kept / pip download)")
    bd.add_argument("--jobs", type=int, default=2)
    bd.add_argument("--capture-python", default=os.path.join(ROOT, ".venv", "bin", "python"),
                    help="a Python whose torch has CUDA (fake CUDA tensors), for `launches` (default: .venv's)")
    la = sub.add_parser("launches", parents=[sel], help="record the ResNet launches as JSON (torch with CUDA)")
    la.add_argument("out")
    ins = sub.add_parser("install", help="copy a warm cache into a TRITON_CACHE_DIR")
    ins.add_argument("warm")
    ins.add_argument("dest")
    vf = sub.add_parser("verify", help="recompile kernels of a warm cache with this Python's Triton; compare")
    vf.add_argument("warm")
    vf.add_argument("--limit", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "stats":
        stats(args.log, args.warm)
    elif args.cmd == "install":
        install(args.warm, args.dest)
    elif args.cmd == "verify":
        os.environ["TRITON_INTERPRET"] = "0"  # (before Triton is imported: compiled, not interpreted kernels)
        import triton_warm
        return 1 if triton_warm.verify(args.warm, args.limit) else 0
    else:
        arch = args.arch.lower().removeprefix("sm_").rstrip("a") if args.cmd == "build" else "90"
        archs, dtypes, batches = args.archs.split(","), args.dtypes.split(","), args.batches.split(",")
        if not arch.isdigit():
            ap.error(f"--arch {args.arch}: expected sm_90a or sm_80")
        if set(archs) - {"resnet50", "resnet18"} or set(dtypes) - {"bf16", "fp16", "fp32"} \
                or not all(b.isdigit() and int(b) > 0 for b in batches):
            ap.error(f"--archs {args.archs} / --dtypes {args.dtypes} / --batches {args.batches}: expected "
                     "resnet50,resnet18 / bf16,fp16,fp32 / positive ints")
        for v in KEY_ENV:  # before Triton is imported (some knobs are read then): the GPU run's key
            os.environ.pop(v, None)
        os.environ["TRITON_INTERPRET"] = "0"
        import triton_warm
        if args.cmd == "launches":
            with open(args.out, "w") as f:
                json.dump(triton_warm.capture(archs, [int(b) for b in batches], dtypes), f)
        else:
            triton_warm.build(args.out, int(arch), dtypes, archs, [int(b) for b in batches], args.python,
                              args.wheel, args.jobs, args.capture_python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
