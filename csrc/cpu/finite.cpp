// fastres._cpu: whether a model call's input holds no NaN and no infinity (fastres.models.input_layout._finite).
//
// A vouched frozen call fuses each ReLU into its convolution as oneDNN's post-op, which turns a NaN into
// 0, so it runs only on a finite input (fastres/models/input_layout.py). torch's x.sum() answered that in
// ~11 us with warm caches and 0.11-0.16 ms in a serving loop, right after the convolutions (its dispatch,
// reduction setup and thread pool, each a cold start; ResNet-50 b8 64 px, 2 CPU cores). This reads the
// values once, in place: a float is not finite when its exponent bits are all ones. Exact (a finite
// input whose fp32 sum overflows is finite here), and at most one pass over the input's bytes.
//
// x: a torch.Tensor (exactly, or a subclass: only its TensorImpl is read). Taken when it is strided,
// float32, on the CPU, not a zero tensor, and contiguous in NCHW or in channels_last order (then its
// numel values are the storage's, from its data pointer on, in some order). Inputs of more than
// kSerial values are split over torch's intra-op threads (at::parallel_for), smaller ones run on the
// caller's thread (waking the pool costs more than they do).
#include "functions.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace {

constexpr int64_t kSerial = 1 << 20;   // values scanned on the caller's thread (4 MiB)
constexpr uint32_t kExponent = 0x7f800000u;

// Whether none of the n floats at p has all exponent bits set (NaN, +-inf). Branch-free over blocks of
// 1024 (so that the compiler vectorizes it), with an exit after a block that found one.
bool finite_run(const float* p, int64_t n) {
  int64_t i = 0;
  while (i < n) {
    const int64_t end = std::min<int64_t>(n, i + 1024);
    uint32_t bad = 0;
    for (; i < end; i++) {
      uint32_t b;
      std::memcpy(&b, p + i, sizeof(b));
      bad |= static_cast<uint32_t>((b & kExponent) == kExponent);
    }
    if (bad) return false;
  }
  return true;
}

}  // namespace

PyObject* all_finite(PyObject*, PyObject* x) {
  if (!THPVariable_Check(x)) Py_RETURN_NONE;
  try {
    const at::Tensor& t = THPVariable_Unpack(x);
    if (t.is_nested() || t.layout() != at::kStrided || t.scalar_type() != at::kFloat || !t.device().is_cpu() ||
        t._is_zerotensor() || !t.has_storage() ||
        !(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)))
      Py_RETURN_NONE;
    const int64_t n = t.numel();
    if (n == 0) Py_RETURN_TRUE;
    if (t.storage().nbytes() < static_cast<size_t>(t.storage_offset() + n) * sizeof(float))
      Py_RETURN_NONE;   // (a storage resized under the tensor: torch's own op says what is wrong)
    const float* p = t.const_data_ptr<float>();
    bool ok;
    if (n <= kSerial) {
      ok = finite_run(p, n);
    } else {
      std::atomic<bool> all{true};
      Py_BEGIN_ALLOW_THREADS
      at::parallel_for(0, n, kSerial / 4, [&](int64_t b, int64_t e) {
        if (all.load(std::memory_order_relaxed) && !finite_run(p + b, e - b)) all.store(false, std::memory_order_relaxed);
      });
      Py_END_ALLOW_THREADS
      ok = all.load();
    }
    if (ok) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
  } catch (const std::exception&) {   // (torch refused the tensor's metadata): the caller's own test
    Py_RETURN_NONE;
  }
}
