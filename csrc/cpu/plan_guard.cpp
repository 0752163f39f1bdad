// fastres._cpu: the per-call proof of a frozen plan's guard (fastres/models/plan_guard.py) in C++.
//
// The guard's Python form reads ~150 module dicts and ~265 small tensors on every call; in a serving
// loop, right after the convolutions have streamed the weights through the caches, that costs ~0.9 ms
// on ResNet-50 (2 CPU cores), most of it interpreter work around cache misses. This file proves the
// same facts with fewer memory touches: dicts compared entry by entry in insertion order (no hash
// lookups), tensors read from their TensorImpl, the small tensors compared with memcmp against one
// snapshot buffer (no concatenation). It proves nothing the Python guard does not: fastres/models/
// plan_guard.py is the one description of what is read; every difference below is a stricter rule
// (a miss, and the full check runs). An error torch raises on a tensor (a nested or sparse one) is a
// miss too, never an exception through Python. No torch ABI beyond at::Tensor and THPVariable; built by setup.py
// when a C++ compiler is present, optional (the Python guard runs without it).
//
// records_hold(records) -> bool. records: list of tuples (m, cls, snap, kinds, kids)
//   m     the module; cls its class when armed (Py_TYPE(m) must be it)
//   snap  a copy of m.__dict__ when armed; the live dict must have the same keys in the same order
//         and, entry by entry, the same value object or an equal str, int, float, complex, bytes or tuple
//         of those (so the live dict == snap, which the Python guard checks, by compares that run no
//         Python code: nothing can change the module while it is being checked)
//   kinds bytes, one per entry of snap: 0 a value, 1 a hook table (a dict that must be empty),
//         2 a geometry attribute (the very same object), 3 the submodule table (exactly a dict, the
//         same one; its values must be `kids`, the same objects in the same order)
//   kids  tuple of the submodules when armed
//
// tensors_hold(pairs, weight_keys, small_types, nones, numels, snapshot) -> bool
//   pairs        list of (conv, bn) module tuples; their tables (_parameters, _buffers) are read live
//                from their instance dicts, as fastres.backends.common.pair_tensors reads them
//   weight_keys  bytes: per pair, the conv weight's key (weight_key below) when armed
//   small_types  tuple of the Python types a small tensor may have (torch.Tensor, nn.Parameter)
//   nones        bytes: per pair, a 5-bit mask of which of (conv bias, BN weight, BN bias, running
//                mean, running var) were None when armed
//   numels       tuple of ints: the length of each small tensor that was not None, in that order
//   snapshot     a float32 buffer (bytes) of all those values, concatenated
//
// weight_key(t) -> bytes: what the fold cache keys a conv weight by (fastres/backends/fold_cache.py
//   state(): object, storage address, version counter (none for an inference tensor), dtype, device,
//   shape, strides) as int64s.
//
// guard_lines(records, pairs) -> bytes: the cache lines (one uintptr_t each, sorted, no repeats) that the
//   two proofs read, at the addresses they have when armed: the records and modules, their instance
//   dicts and tables, the tensors' objects, TensorImpls, storages and first data lines.
// prefetch(lines) -> None: asks the CPU to fetch those lines, all at once, before a proof runs. In a
//   serving loop the convolutions of the call before have evicted every one of them, and the proofs
//   follow one pointer after another, each waiting for its miss in turn: 0.24 ms each cold against
//   0.03-0.04 ms hot on ResNet-50 (2 CPU cores). A prefetch is a hint to the CPU: a line whose object has
//   moved or been freed since is a wasted fetch, never a fault or a read the proofs rely on (they read
//   everything live, as without it).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include "functions.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace {

// The instance dict of m (a new reference), or nullptr.
PyObject* dict_of(PyObject* m) {
  PyObject* d = PyObject_GenericGetDict(m, nullptr);
  if (d == nullptr) PyErr_Clear();
  return d;
}

// Whether b is a, or an equal value of an immutable builtin type (str, int, float, complex, bytes, or a
// tuple of such): equal by compares that run no Python code, so nothing can change the module while it is
// checked (an __eq__ that registers a hook or rebinds a stride would). Anything else equal but not the
// same object is a miss (the full check runs, and arms again).
bool same_value(PyObject* a, PyObject* b) {
  if (a == b) return true;
  if (Py_TYPE(a) != Py_TYPE(b)) return false;
  if (PyTuple_CheckExact(a)) {
    Py_ssize_t n = PyTuple_GET_SIZE(a);
    if (PyTuple_GET_SIZE(b) != n) return false;
    for (Py_ssize_t i = 0; i < n; i++)
      if (!same_value(PyTuple_GET_ITEM(a, i), PyTuple_GET_ITEM(b, i))) return false;
    return true;
  }
  if (!(PyUnicode_CheckExact(a) || PyLong_CheckExact(a) || PyFloat_CheckExact(a) || PyComplex_CheckExact(a) ||
        PyBytes_CheckExact(a)))
    return false;
  int eq = PyObject_RichCompareBool(a, b, Py_EQ);
  if (eq < 0) PyErr_Clear();
  return eq == 1;
}

bool kids_hold(PyObject* table, PyObject* kids) {
  // (exactly a dict: an OrderedDict's own order is not the storage order PyDict_Next walks)
  if (!PyDict_CheckExact(table) || !PyTuple_Check(kids) || PyDict_GET_SIZE(table) != PyTuple_GET_SIZE(kids))
    return false;
  Py_ssize_t pos = 0, i = 0;
  PyObject *k, *v;
  while (PyDict_Next(table, &pos, &k, &v)) {
    if (v != PyTuple_GET_ITEM(kids, i++)) return false;
  }
  return true;
}

bool record_holds(PyObject* r) {
  if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 5) return false;
  PyObject* m = PyTuple_GET_ITEM(r, 0);
  PyObject* snap = PyTuple_GET_ITEM(r, 2);
  PyObject* kinds = PyTuple_GET_ITEM(r, 3);
  if ((PyObject*)Py_TYPE(m) != PyTuple_GET_ITEM(r, 1) || !PyDict_Check(snap) || !PyBytes_Check(kinds)) return false;
  PyObject* d = dict_of(m);
  if (d == nullptr) return false;
  bool ok = PyDict_Check(d) && PyDict_GET_SIZE(d) == PyDict_GET_SIZE(snap) &&
            PyBytes_GET_SIZE(kinds) == PyDict_GET_SIZE(snap);
  const char* kind = PyBytes_AS_STRING(kinds);
  Py_ssize_t pa = 0, pb = 0, i = 0;
  PyObject *ka, *va, *kb, *vb;
  while (ok && PyDict_Next(d, &pa, &ka, &va)) {
    if (!PyDict_Next(snap, &pb, &kb, &vb)) { ok = false; break; }
    // (borrowed: no Python code runs while they are read, and a refcount written per value would be a
    // cache miss per value in a serving loop, where nothing else of a value that is the same object is read)
    ok = ka == kb || same_value(ka, kb);
    if (ok) {
      switch (kind[i]) {
        case 0: ok = same_value(va, vb); break;
        case 1: ok = PyDict_Check(va) && PyDict_GET_SIZE(va) == 0 && same_value(va, vb); break;
        case 2: ok = va == vb; break;
        case 3: ok = same_value(va, vb) && kids_hold(va, PyTuple_GET_ITEM(r, 4)); break;
        default: ok = false;
      }
    }
    i++;
  }
  if (ok && PyDict_Next(snap, &pb, &kb, &vb)) ok = false;   // (the copy has entries the live dict lost)
  Py_DECREF(d);
  return ok;
}

PyObject* records_hold(PyObject*, PyObject* records) {
  if (!PyList_Check(records)) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records); i++) {
    if (!record_holds(PyList_GET_ITEM(records, i))) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

void key_of(const at::Tensor& t, PyObject* obj, std::vector<int64_t>& out) {
  if (t.is_nested() || t.layout() != at::kStrided) throw std::runtime_error("not a strided tensor");
  out.push_back(reinterpret_cast<int64_t>(obj));
  out.push_back(t.has_storage() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0);
  out.push_back(t.is_inference() ? -1 : static_cast<int64_t>(t._version()));
  out.push_back(static_cast<int64_t>(t.scalar_type()));
  out.push_back(static_cast<int64_t>(t.device().type()));
  out.push_back(t.device().index());
  out.push_back(static_cast<int64_t>(t.layout()));
  out.push_back(t.dim());
  for (int64_t s : t.sizes()) out.push_back(s);
  for (int64_t s : t.strides()) out.push_back(s);
}

PyObject* weight_key(PyObject*, PyObject* obj) {
  if (!THPVariable_Check(obj)) {
    PyErr_SetString(PyExc_TypeError, "weight_key: expected a tensor");
    return nullptr;
  }
  std::vector<int64_t> k;
  try {
    key_of(THPVariable_Unpack(obj), obj, k);
  } catch (const std::exception& e) {   // (a tensor whose sizes or strides torch will not give: nested, sparse)
    PyErr_SetString(PyExc_TypeError, e.what());
    return nullptr;
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(k.data()), k.size() * sizeof(int64_t));
}

// The value of `name` in module m's table `table` (a new reference), or nullptr (no such table or entry).
PyObject* table_entry(PyObject* m, PyObject* table, PyObject* name) {
  PyObject* d = dict_of(m);
  if (d == nullptr) return nullptr;
  PyObject* t = PyDict_GetItemWithError(d, table);
  Py_XINCREF(t);
  PyObject* v = (t != nullptr && PyDict_Check(t)) ? PyDict_GetItemWithError(t, name) : nullptr;
  Py_XINCREF(v);
  if (PyErr_Occurred()) PyErr_Clear();
  Py_XDECREF(t);
  Py_DECREF(d);
  return v;
}

// Owns the references it holds: every return below drops them.
struct Refs {
  PyObject* p[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  ~Refs() { for (PyObject* o : p) Py_XDECREF(o); }
};

PyObject *s_params, *s_buffers, *s_weight, *s_bias, *s_mean, *s_var;

bool small_ok(PyObject* obj, PyObject* types, int64_t numel, const char* want) {
  bool typed = false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); i++) typed |= (PyObject*)Py_TYPE(obj) == PyTuple_GET_ITEM(types, i);
  if (!typed || !THPVariable_Check(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.is_nested() || t.layout() != at::kStrided || t.scalar_type() != at::kFloat || !t.device().is_cpu() || t.dim() != 1 ||
      t.numel() != numel || !t.has_storage() || t.is_neg() || t.is_conj() || (numel > 1 && t.stride(0) != 1))
    return false;
  if (numel == 0) return true;
  const size_t end = (static_cast<size_t>(t.storage_offset()) + static_cast<size_t>(numel)) * sizeof(float);
  if (t.storage().nbytes() < end) return false;   // (a storage resized under the tensor)
  return std::memcmp(t.const_data_ptr(), want, numel * sizeof(float)) == 0;
}

PyObject* tensors_hold_(PyObject* args);

PyObject* tensors_hold(PyObject*, PyObject* args) {
  try {
    return tensors_hold_(args);
  } catch (const std::exception&) {   // (torch refused a tensor's metadata: nested, sparse): a miss
    Py_RETURN_FALSE;
  }
}

PyObject* tensors_hold_(PyObject* args) {
  PyObject *pairs, *wkeys, *types, *nones, *numels, *snapshot;
  if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!", &PyList_Type, &pairs, &PyTuple_Type, &wkeys, &PyTuple_Type, &types,
                        &PyBytes_Type, &nones, &PyTuple_Type, &numels, &PyBytes_Type, &snapshot))
    return nullptr;
  Py_ssize_t n = PyList_GET_SIZE(pairs);
  if (PyTuple_GET_SIZE(wkeys) != n || PyBytes_GET_SIZE(nones) != n) Py_RETURN_FALSE;
  const char* mask = PyBytes_AS_STRING(nones);
  const char* want = PyBytes_AS_STRING(snapshot);
  Py_ssize_t left = PyBytes_GET_SIZE(snapshot), j = 0;
  std::vector<int64_t> key;
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject* pair = PyList_GET_ITEM(pairs, i);
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) Py_RETURN_FALSE;
    PyObject *conv = PyTuple_GET_ITEM(pair, 0), *bn = PyTuple_GET_ITEM(pair, 1);
    Refs refs;
    PyObject* w = refs.p[5] = table_entry(conv, s_params, s_weight);
    if (w == nullptr || !THPVariable_Check(w)) Py_RETURN_FALSE;
    key.clear();
    key_of(THPVariable_Unpack(w), w, key);
    PyObject* wk = PyTuple_GET_ITEM(wkeys, i);
    if (!PyBytes_Check(wk) || PyBytes_GET_SIZE(wk) != (Py_ssize_t)(key.size() * sizeof(int64_t)) ||
        std::memcmp(PyBytes_AS_STRING(wk), key.data(), key.size() * sizeof(int64_t)) != 0)
      Py_RETURN_FALSE;
    PyObject** five = refs.p;
    five[0] = table_entry(conv, s_params, s_bias);
    five[1] = table_entry(bn, s_params, s_weight);
    five[2] = table_entry(bn, s_params, s_bias);
    five[3] = table_entry(bn, s_buffers, s_mean);
    five[4] = table_entry(bn, s_buffers, s_var);
    for (int f = 0; f < 5; f++) {
      bool was_none = (mask[i] >> f) & 1;
      if (five[f] == nullptr) Py_RETURN_FALSE;   // (not in its table: the Python guard reads the attribute)
      if (was_none != (five[f] == Py_None)) Py_RETURN_FALSE;
      if (was_none) continue;
      if (j >= PyTuple_GET_SIZE(numels)) Py_RETURN_FALSE;
      int64_t k = PyLong_AsLongLong(PyTuple_GET_ITEM(numels, j++));
      if (k < 0 || k > left / (Py_ssize_t)sizeof(float)) { PyErr_Clear(); Py_RETURN_FALSE; }
      if (!small_ok(five[f], types, k, want)) Py_RETURN_FALSE;
      want += k * sizeof(float);
      left -= k * sizeof(float);
    }
  }
  if (left != 0 || j != PyTuple_GET_SIZE(numels)) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
}

// The lines that guard_lines collects, rounded down to 64 bytes.
struct Lines {
  std::vector<uintptr_t> at;
  void add(const void* p, size_t bytes) {
    if (p == nullptr) return;
    const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
    for (uintptr_t q = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); q < end; q += 64) at.push_back(q);
  }
  void object(PyObject* o) {   // (and the words before it, where CPython keeps a managed dict's pointer)
    if (o != nullptr) add(reinterpret_cast<const char*>(o) - 32, 96);
  }
  void dict(PyObject* d) {   // the dict object and its table (keys, indices, entries; a split table's values)
    if (d == nullptr || !PyDict_Check(d)) return;
    const PyDictObject* p = reinterpret_cast<const PyDictObject*>(d);
    add(p, sizeof(PyDictObject));
    if (p->ma_used == 0) return;
    add(p->ma_keys, 192 + 48 * static_cast<size_t>(p->ma_used));
    if (p->ma_values != nullptr) add(reinterpret_cast<const char*>(p->ma_values) - 128, 192 + 8 * p->ma_used);
  }
  void tensor(PyObject* v) {
    object(v);
    if (v == nullptr || !THPVariable_Check(v)) return;
    const at::Tensor& t = THPVariable_Unpack(v);
    add(t.unsafeGetTensorImpl(), 256);
    if (t.is_nested() || t.layout() != at::kStrided || !t.has_storage()) return;
    add(t.storage().unsafeGetStorageImpl(), 128);
    add(t.const_data_ptr(), std::min<size_t>(t.storage().nbytes(), 256));
  }
};

void record_lines(PyObject* r, Lines& out) {
  if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 5) return;
  out.add(r, 64);
  PyObject* m = PyTuple_GET_ITEM(r, 0);
  PyObject* snap = PyTuple_GET_ITEM(r, 2);
  PyObject* kinds = PyTuple_GET_ITEM(r, 3);
  out.object(m);
  out.add(Py_TYPE(m), 384);
  out.dict(snap);
  out.object(kinds);
  out.add(PyTuple_GET_ITEM(r, 4), 24 + 8 * static_cast<size_t>(PyTuple_GET_SIZE(PyTuple_GET_ITEM(r, 4))));
  PyObject* d = dict_of(m);
  out.dict(d);
  Py_XDECREF(d);
  if (!PyDict_Check(snap) || !PyBytes_Check(kinds) || PyBytes_GET_SIZE(kinds) != PyDict_GET_SIZE(snap)) return;
  Py_ssize_t pos = 0, i = 0;
  PyObject *k, *v;
  while (PyDict_Next(snap, &pos, &k, &v)) {   // (the tables a proof reads into: hooks, submodules)
    const char kind = PyBytes_AS_STRING(kinds)[i++];
    if (kind == 1 || kind == 3) out.dict(v);
  }
}

void pair_lines(PyObject* pair, Lines& out) {
  if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) return;
  out.add(pair, 48);
  for (int side = 0; side < 2; side++) {
    PyObject* d = dict_of(PyTuple_GET_ITEM(pair, side));
    if (d == nullptr) continue;
    Refs held;   // (dropped also when torch throws on a tensor below)
    held.p[0] = d;
    if (PyDict_Check(d)) {
      for (PyObject* name : {s_params, s_buffers}) {
        PyObject* table = PyDict_GetItemWithError(d, name);
        if (table == nullptr || !PyDict_Check(table)) continue;
        out.dict(table);
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(table, &pos, &k, &v)) out.tensor(v);
      }
    }
    if (PyErr_Occurred()) PyErr_Clear();
  }
}

PyObject* guard_lines(PyObject*, PyObject* args) {
  PyObject *records, *pairs;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &records, &PyList_Type, &pairs)) return nullptr;
  Lines out;
  try {
    out.add(records, 64);
    out.add(reinterpret_cast<PyListObject*>(records)->ob_item, 8 * static_cast<size_t>(PyList_GET_SIZE(records)));
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records); i++) record_lines(PyList_GET_ITEM(records, i), out);
    out.add(pairs, 56 + 8 * static_cast<size_t>(PyList_GET_SIZE(pairs)));
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pairs); i++) pair_lines(PyList_GET_ITEM(pairs, i), out);
  } catch (const std::exception&) {   // (torch refused a tensor's metadata: the lines so far)
  }
  std::sort(out.at.begin(), out.at.end());
  out.at.erase(std::unique(out.at.begin(), out.at.end()), out.at.end());
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.at.data()), out.at.size() * sizeof(uintptr_t));
}

PyObject* prefetch(PyObject*, PyObject* lines) {
  if (!PyBytes_Check(lines)) {
    PyErr_SetString(PyExc_TypeError, "prefetch: expected bytes from guard_lines");
    return nullptr;
  }
  const char* p = PyBytes_AS_STRING(lines);
  const Py_ssize_t n = PyBytes_GET_SIZE(lines) / static_cast<Py_ssize_t>(sizeof(uintptr_t));
  for (Py_ssize_t i = 0; i < n; i++) {
    uintptr_t a;
    std::memcpy(&a, p + i * sizeof(uintptr_t), sizeof(a));
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 1);   // (a hint: never faults; to L2, measured best)
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"records_hold", records_hold, METH_O, "Whether every module record still holds (csrc/cpu/plan_guard.cpp)."},
    {"tensors_hold", tensors_hold, METH_VARARGS, "Whether every pair's tensors still hold (csrc/cpu/plan_guard.cpp)."},
    {"weight_key", weight_key, METH_O, "A conv weight's key, as fastres.backends.fold_cache.state reads it."},
    {"guard_lines", guard_lines, METH_VARARGS, "The cache lines the two proofs read (csrc/cpu/plan_guard.cpp)."},
    {"prefetch", prefetch, METH_O, "Ask the CPU to fetch guard_lines' lines (csrc/cpu/plan_guard.cpp)."},
    {"all_finite", all_finite, METH_O, "Whether a dense CPU float32 tensor holds no NaN or infinity (csrc/cpu/finite.cpp)."},
    {"pooled_linear", pooled_linear, METH_VARARGS, "A global-average-pooled nn.Linear head (csrc/cpu/pooled_linear.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "fastres's CPU helpers (csrc/cpu/plan_guard.cpp)", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__cpu(void) {
  s_params = PyUnicode_InternFromString("_parameters");
  s_buffers = PyUnicode_InternFromString("_buffers");
  s_weight = PyUnicode_InternFromString("weight");
  s_bias = PyUnicode_InternFromString("bias");
  s_mean = PyUnicode_InternFromString("running_mean");
  s_var = PyUnicode_InternFromString("running_var");
  return PyModule_Create(&module);
}
