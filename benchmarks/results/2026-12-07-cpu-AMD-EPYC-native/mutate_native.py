import subprocess, shutil, os, sys
SRC = "/work/main/csrc/cpu/plan_guard.cpp"
SO = "/work/main/fastres/_cpu.cpython-311-x86_64-linux-gnu.so"
orig = open(SRC).read()
M = {
 "type": ("(PyObject*)Py_TYPE(m) != PyTuple_GET_ITEM(r, 1) ||", "false ||"),
 "value": ("case 0: ok = same_value(va, vb); break;", "case 0: ok = true; break;"),
 "hooks": ("case 1: ok = PyDict_Check(va) && PyDict_GET_SIZE(va) == 0 && same_value(va, vb); break;", "case 1: ok = true; break;"),
 "geometry": ("case 2: ok = va == vb; break;", "case 2: ok = same_value(va, vb); break;"),
 "kids": ("&& kids_hold(va, PyTuple_GET_ITEM(r, 4))", ""),
 "wkey": ("std::memcmp(PyBytes_AS_STRING(wk), key.data(), key.size() * sizeof(int64_t)) != 0)", "false)"),
 "nones": ("if (was_none != (five[f] == Py_None)) Py_RETURN_FALSE;", ""),
 "memcmp": ("return numel == 0 || std::memcmp(t.const_data_ptr(), want, numel * sizeof(float)) == 0;", "return true;"),
 "neg": ("t.is_neg() ||", ""),
 "stride": ("|| (numel > 1 && t.stride(0) != 1)", ""),
 "numel": ("t.numel() != numel ||", ""),
 "dictsize": ("PyDict_GET_SIZE(d) == PyDict_GET_SIZE(snap) &&", ""),
 "keys": ("ok = ka == kb || same_value(ka, kb);", "ok = true;"),
 "richcompare": ("  if (a == b) return true;\n  if (Py_TYPE(a) != Py_TYPE(b)) return false;", "  if (a == b) return true;\n  { int e = PyObject_RichCompareBool(a, b, Py_EQ); if (e < 0) PyErr_Clear(); return e == 1; }"),
 "nested": ("  if (t.is_nested() || t.layout() != at::kStrided ||", "  if ("),
}
names = sys.argv[1:] or list(M)
shutil.copy(SO, "/tmp/w/mut/good.so")
env = dict(os.environ)
try:
    for n in names:
        a, b = M[n]
        assert orig.count(a) == 1, n
        open("/tmp/w/mut/m.cpp", "w").write(orig.replace(a, b))
        bd = f"/tmp/w/mut/b_{n}"; os.makedirs(bd, exist_ok=True)
        r = subprocess.run([sys.executable, "-c", f"from torch.utils.cpp_extension import load; load(name='_cpu', sources=['/tmp/w/mut/m.cpp'], extra_cflags=['-O2','-std=c++20'], build_directory='{bd}')"], capture_output=True, text=True)
        if r.returncode: print(n, "BUILD FAILED", r.stderr[-500:], flush=True); continue
        shutil.copy(f"{bd}/_cpu.so", SO)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "native",
                            "tests/dropin/test_frozen_plan_guard.py", "tests/dropin/test_frozen_plan_guard_cases.py"],
                           cwd="/work/main", capture_output=True, text=True)
        last = [l for l in r.stdout.splitlines() if l.strip()][-1]
        fail = [l for l in r.stdout.splitlines() if l.startswith("FAILED")]
        print(n, "CAUGHT" if r.returncode else "NOT CAUGHT", last, fail[:1], flush=True)
finally:
    shutil.copy("/tmp/w/mut/good.so", SO)
