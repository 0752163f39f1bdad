// fastres._C host code: the ops fastres::bn_stats, fastres::bn_apply, fastres::bn_backward.
//
// Each op validates its tensors (device, dtype, channels_last layout, shapes) with errors that name
// what was expected, allocates its outputs and workspace, and launches the kernels of
// batchnorm_{stats,apply,backward}.cu on the current CUDA stream of the input's device. The semantics
// are in batchnorm_kernels.h; the Python side (fake implementations, the "cuda" backend of conv_bn_act)
// is fastres/backends/cuda.py.
//
// Poisoning for tests: while fastres._C._set_poison(True) is in effect, every output and workspace
// this file allocates is filled with NaN (float) or 0xA5 bytes (uint8) before the kernels run, so an
// element a kernel fails to write fails the test. fastres/backends/cuda.py switches it on and off to
// follow fastres.kernels.alloc.poisoned().
//
// The module is a plain CPython extension (no pybind11) to keep the compile short.
#include <Python.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "batchnorm_kernels.h"

namespace fastres {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::atomic<bool> g_poison{false};

// An uninitialised tensor (poisoned under _set_poison(True)).
Tensor new_tensor(at::IntArrayRef shape, const at::TensorOptions& opts,
                  at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  Tensor t = at::empty(shape, opts, fmt);
  if (g_poison.load() && t.numel() > 0) {
    if (t.is_floating_point()) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(0xA5);
    }
  }
  return t;
}

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    default: return DType::bf16;
  }
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// A data tensor: 4-D (N, C, H, W), float32/float16/bfloat16, dense channels_last.
void check_data(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.defined(), "fastres::", op, ": expected a tensor for ", name, ", got None");
  TORCH_CHECK(t.dim() == 4, "fastres::", op, ": expected ", name, " to be 4-D (N, C, H, W), got ",
              t.dim(), "-D of shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "fastres::", op,
              ": expected ", name, " of dtype float32, float16 or bfloat16, got ", dtype_name(st));
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "fastres::", op, ": expected ", name,
              " in dense channels_last layout (NHWC; x.contiguous(memory_format=torch.channels_last)), "
              "got shape ", t.sizes(), " with strides ", t.strides());
  TORCH_CHECK(t.size(1) <= std::numeric_limits<int>::max(), "fastres::", op, ": ", name, " has ",
              t.size(1), " channels, more than the kernels support (2^31 - 1)");
}

// Checked after every other check of an op (so that those can be tested on a machine without a GPU):
// the data lives on a CUDA device; the other tensors were checked to be on the same device.
void check_cuda(const char* op, const Tensor& z) {
  TORCH_CHECK(z.is_cuda(), "fastres::", op, ": expected tensors on a CUDA device (the fastres CUDA "
              "kernels have no CPU implementation; the torch backend runs on CPU), got z on ",
              z.device());
}

// A second data tensor that must match `ref` (shape, dtype, device, layout).
void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  check_data(op, name, t);
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastres::", op, ": expected ", name, " of shape ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastres::", op, ": expected ", name, " of dtype ",
              dtype_name(ref.scalar_type()), ", got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == ref.device(), "fastres::", op, ": expected ", name, " on ", ref.device(),
              ", got ", t.device());
}

// A per-channel fp32 vector the kernels read as is (mean, invstd): float32, shape (C,), contiguous.
void check_channels_f32(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  const int64_t C = ref.size(1);
  TORCH_CHECK(t.defined(), "fastres::", op, ": expected a tensor for ", name, ", got None");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastres::", op, ": expected ", name,
              " of dtype float32, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fastres::", op, ": expected ", name, " of shape (", C,
              ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastres::", op, ": expected ", name, " to be contiguous");
  TORCH_CHECK(t.device() == ref.device(), "fastres::", op, ": expected ", name, " on ", ref.device(),
              ", got ", t.device());
}

// An optional per-channel parameter (weight, bias, running stats) of any floating dtype, shape (C,).
void check_channels_any(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  const int64_t C = ref.size(1);
  TORCH_CHECK(t.is_floating_point(), "fastres::", op, ": expected ", name,
              " of a floating dtype, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fastres::", op, ": expected ", name, " of shape (", C,
              ",), got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), "fastres::", op, ": expected ", name, " on ", ref.device(),
              ", got ", t.device());
}

void check_optional_channels(const char* op, const char* name, const OptTensor& t, const Tensor& ref) {
  if (t.has_value() && t->defined()) check_channels_any(op, name, *t, ref);
}

// An optional per-channel parameter as the fp32 contiguous vector the kernels read (a copy only when
// it is not one already); undefined when absent.
Tensor channels_f32(const char* op, const char* name, const OptTensor& t, const Tensor& ref) {
  if (!t.has_value() || !t->defined()) return Tensor();
  check_channels_any(op, name, *t, ref);
  return t->scalar_type() == at::kFloat && t->is_contiguous() ? *t : t->to(at::kFloat).contiguous();
}

const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fastres::", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// The grid counters of the reductions (bn_stats, bn_backward): at least n zeroed int32 on ref's device,
// for launches on the current stream. The kernels leave every counter zero (the last block of each
// channel column resets its own: grid_reduce in batchnorm_common.cuh), so one buffer per device and
// stream, zeroed once when allocated and grown to the largest grid seen, serves every launch on that
// stream (they run one after the other) without a memset per call. Launches being captured into a
// CUDA graph get a fresh zeroed buffer instead, owned by the graph, whose zeroing is a node of the
// graph: the cache must never hold memory whose zeroing was only recorded, not run. The cache is
// never freed (it would outlive the CUDA context at exit); it holds a few KB per stream.
Tensor grid_counters(int64_t n, const Tensor& ref) {
  const auto opts = ref.options().dtype(at::kInt);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(ref.device().index());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream.stream(), &capture);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not left behind for the launch checks of a later op
    TORCH_CHECK(false, "fastres: cudaStreamIsCapturing failed: ", cudaGetErrorString(err));
  }
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({n}, opts);
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int, int64_t>, Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  Tensor& counters = (*cache)[{static_cast<int>(ref.device().index()), static_cast<int64_t>(stream.id())}];
  // Replacing a smaller buffer is safe: the caching allocator hands its memory to later work of the
  // same stream only, which runs after the launches that used it.
  if (!counters.defined() || counters.numel() < n) counters = at::zeros({n}, opts);
  return counters;
}

// Staging buffer (poisonable) and zeroed counters for a reduction plan.
std::pair<Tensor, Tensor> workspace(const ReducePlan& plan, const Tensor& ref) {
  Tensor staging = new_tensor({plan.staging_floats}, ref.options().dtype(at::kFloat));
  return {staging, grid_counters(plan.counters, ref)};
}

std::tuple<Tensor, Tensor> bn_stats(const Tensor& z, const OptTensor& running_mean,
                                    const OptTensor& running_var, double momentum, double eps) {
  const char* op = "bn_stats";
  check_data(op, "z", z);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv, "fastres::bn_stats: expected running_mean and running_var together "
              "(both tensors or both None)");
  const int64_t C = z.size(1);
  const int64_t M = C > 0 ? z.numel() / C : 0;
  TORCH_CHECK(M > 0, "fastres::bn_stats: expected at least one value per channel, got z of shape ",
              z.sizes());
  if (has_rm) {
    check_channels_any(op, "running_mean", *running_mean, z);
    check_channels_any(op, "running_var", *running_var, z);
  }
  check_cuda(op, z);
  c10::cuda::CUDAGuard guard(z.device());
  const auto f32 = z.options().dtype(at::kFloat);
  Tensor mean = new_tensor({C}, f32), invstd = new_tensor({C}, f32);
  // Running statistics are updated in place; buffers that are not fp32 (a model in .half()) are
  // updated through an fp32 copy.
  Tensor rm, rv;
  if (has_rm) {
    auto direct = [](const Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous(); };
    rm = direct(*running_mean) ? *running_mean : running_mean->to(at::kFloat).contiguous();
    rv = direct(*running_var) ? *running_var : running_var->to(at::kFloat).contiguous();
  }
  const ReducePlan plan = plan_reduction(M, static_cast<int>(C), kernel_dtype(z.scalar_type()), aligned16(z));
  auto [staging, counters] = workspace(plan, z);
  StatsArgs a{};
  a.z = z.data_ptr();
  a.M = M;
  a.C = static_cast<int>(C);
  a.dt = kernel_dtype(z.scalar_type());
  a.mean = mean.data_ptr<float>();
  a.invstd = invstd.data_ptr<float>();
  a.running_mean = has_rm ? rm.data_ptr<float>() : nullptr;
  a.running_var = has_rm ? rv.data_ptr<float>() : nullptr;
  a.momentum = static_cast<float>(momentum);
  a.eps = static_cast<float>(eps);
  a.staging = staging.data_ptr<float>();
  a.counters = counters.data_ptr<int>();
  check_launch(op, launch_bn_stats(a, plan, c10::cuda::getCurrentCUDAStream().stream()));
  if (has_rm) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {mean, invstd};
}

std::tuple<Tensor, Tensor> bn_apply(const Tensor& z, const Tensor& mean, const Tensor& invstd,
                                    const OptTensor& weight, const OptTensor& bias,
                                    const OptTensor& residual, bool relu, bool save_mask) {
  const char* op = "bn_apply";
  check_data(op, "z", z);
  check_channels_f32(op, "mean", mean, z);
  check_channels_f32(op, "invstd", invstd, z);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like(op, "residual", *residual, z);
  check_optional_channels(op, "weight", weight, z);
  check_optional_channels(op, "bias", bias, z);
  check_cuda(op, z);
  c10::cuda::CUDAGuard guard(z.device());
  const Tensor w = channels_f32(op, "weight", weight, z), b = channels_f32(op, "bias", bias, z);
  Tensor y = new_tensor(z.sizes(), z.options(), at::MemoryFormat::ChannelsLast);
  const bool want_mask = relu && save_mask;
  Tensor mask = new_tensor({want_mask ? (z.numel() + 7) / 8 : 0}, z.options().dtype(at::kByte));
  if (z.numel() == 0) return {y, mask};
  ApplyArgs a{};
  a.z = z.data_ptr();
  a.residual = has_res ? residual->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.invstd = invstd.data_ptr<float>();
  a.weight = fptr(w);
  a.bias = fptr(b);
  a.mask = want_mask ? mask.data_ptr<uint8_t>() : nullptr;
  a.C = static_cast<int>(z.size(1));
  a.M = z.numel() / a.C;
  a.dt = kernel_dtype(z.scalar_type());
  a.relu = relu;
  check_launch(op, launch_bn_apply(a, c10::cuda::getCurrentCUDAStream().stream()));
  return {y, mask};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward(const Tensor& grad_y, const Tensor& z,
                                                       const Tensor& mask, const Tensor& mean,
                                                       const Tensor& invstd, const OptTensor& weight,
                                                       bool training, bool relu, bool need_dres) {
  const char* op = "bn_backward";
  check_data(op, "z", z);
  check_like(op, "grad_y", grad_y, z);
  check_channels_f32(op, "mean", mean, z);
  check_channels_f32(op, "invstd", invstd, z);
  if (relu) {
    const int64_t bytes = (z.numel() + 7) / 8;
    TORCH_CHECK(mask.defined() && mask.scalar_type() == at::kByte && mask.dim() == 1 &&
                    mask.size(0) == bytes && mask.is_contiguous(),
                "fastres::bn_backward: with relu=True expected mask to be the packed ReLU mask of y: "
                "a contiguous 1-D uint8 tensor of ", bytes, " bytes (ceil(numel / 8)), got ",
                mask.defined() ? dtype_name(mask.scalar_type()) : "None", " of shape ",
                mask.defined() ? mask.sizes() : at::IntArrayRef{});
    TORCH_CHECK(mask.device() == z.device(), "fastres::bn_backward: expected mask on ", z.device(),
                ", got ", mask.device());
  }
  check_optional_channels(op, "weight", weight, z);
  check_cuda(op, z);
  c10::cuda::CUDAGuard guard(z.device());
  const Tensor w = channels_f32(op, "weight", weight, z);
  const auto f32 = z.options().dtype(at::kFloat);
  const int64_t C = z.size(1);
  Tensor dz = new_tensor(z.sizes(), z.options(), at::MemoryFormat::ChannelsLast);
  Tensor dgamma = new_tensor({C}, f32), dbeta = new_tensor({C}, f32);
  Tensor dres = need_dres ? new_tensor(z.sizes(), z.options(), at::MemoryFormat::ChannelsLast)
                          : new_tensor({0}, z.options());
  const int64_t M = C > 0 ? z.numel() / C : 0;
  if (M == 0) {  // no values: the sums are zero, there is nothing else to write
    dgamma.zero_();
    dbeta.zero_();
    return {dz, dgamma, dbeta, dres};
  }
  const DType dt = kernel_dtype(z.scalar_type());
  const ReducePlan plan = plan_reduction(M, static_cast<int>(C), dt, aligned16(grad_y) && aligned16(z));
  auto [staging, counters] = workspace(plan, z);
  Tensor coef = new_tensor({3 * C}, f32);
  BackwardArgs a{};
  a.grad_y = grad_y.data_ptr();
  a.z = z.data_ptr();
  a.mask = relu ? mask.data_ptr<uint8_t>() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.invstd = invstd.data_ptr<float>();
  a.weight = fptr(w);
  a.dz = dz.data_ptr();
  a.dres = need_dres ? dres.data_ptr() : nullptr;
  a.dgamma = dgamma.data_ptr<float>();
  a.dbeta = dbeta.data_ptr<float>();
  a.coef = coef.data_ptr<float>();
  a.staging = staging.data_ptr<float>();
  a.counters = counters.data_ptr<int>();
  a.M = M;
  a.C = static_cast<int>(C);
  a.dt = dt;
  a.training = training;
  check_launch(op, launch_bn_backward(a, plan, c10::cuda::getCurrentCUDAStream().stream()));
  return {dz, dgamma, dbeta, dres};
}

}  // namespace
}  // namespace fastres

// The schemas are shared with the Triton backend's host functions (kernels/batchnorm.py). The fake
// (meta) implementations live in Python, in the module named here.
TORCH_LIBRARY(fastres, m) {
  m.set_python_module("fastres.backends.cuda");
  m.def("bn_stats(Tensor z, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
        "float eps) -> (Tensor mean, Tensor invstd)");
  m.def("bn_apply(Tensor z, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
        "Tensor? residual, bool relu, bool save_mask) -> (Tensor y, Tensor mask)");
  m.def("bn_backward(Tensor grad_y, Tensor z, Tensor mask, Tensor mean, Tensor invstd, "
        "Tensor? weight, bool training, bool relu, bool need_dres) "
        "-> (Tensor dz, Tensor dgamma, Tensor dbeta, Tensor dres)");
}

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("bn_stats", &fastres::bn_stats);
  m.impl("bn_apply", &fastres::bn_apply);
  m.impl("bn_backward", &fastres::bn_backward);
}

// On CPU tensors the same functions run only to fail their checks with a message that names the
// device (instead of the dispatcher's generic "could not run ... with arguments from the CPU backend").
TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("bn_stats", &fastres::bn_stats);
  m.impl("bn_apply", &fastres::bn_apply);
  m.impl("bn_backward", &fastres::bn_backward);
}

// ---- the Python module fastres._C ----------------------------------------------------------------

static PyObject* fastres_set_poison(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const bool previous = fastres::g_poison.exchange(on != 0);
  return PyBool_FromLong(previous);
}

static PyMethodDef fastres_methods[] = {
    {"_set_poison", fastres_set_poison, METH_O,
     "_set_poison(on) -> previous: fill every output the fastres::bn_* ops allocate with NaN / 0xA5 "
     "before their kernels run (tests)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef fastres_module = {PyModuleDef_HEAD_INIT, "fastres._C",
                                     "CUDA C++ BatchNorm kernels of fastres: importing registers the ops "
                                     "fastres::bn_stats, fastres::bn_apply and fastres::bn_backward.",
                                     -1, fastres_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastres_module); }
