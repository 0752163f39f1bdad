// bn_stats of fastres._C: per-channel mean and invstd of NHWC data seen as [M, C] (fp32 Welford per
// thread, Chan merges along a fixed block tree, then across the grid by the last block of each
// channel column; see batchnorm_common.cuh), and the running-statistics update of nn.BatchNorm2d.
#include "batchnorm_common.cuh"

namespace fastres {
namespace {

using namespace detail;

// Grid (gx, gy), block (bx, by): thread (tx, ty) of block (X, Y) owns channels
// c0 = (X * bx + tx) * V .. c0 + V - 1 and rows r = Y * by + ty + k * gy * by.
//   T: element type of z; V: channels per thread (16 / sizeof(T) on the vector path, else 1).
//   a: the arguments (batchnorm_kernels.h, StatsArgs): z [M, C], outputs mean / invstd [C], running
//      stats [C] or null, workspace staging / counters of the launch's ReducePlan.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) bn_stats_kernel(StatsArgs a) {
  __shared__ ReduceShared<V> sh;
  const T* z = static_cast<const T*>(a.z);
  const int C = a.C;
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  Acc<V> s;
  acc_zero(s);
  if (c0 < C) {
    const int64_t step = (int64_t)gridDim.y * blockDim.y;
    int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y;
    for (; r + 3 * step < a.M; r += 4 * step) {  // four rows in flight
      float x0[V], x1[V], x2[V], x3[V];
      load_f<T, V>(z + r * C + c0, x0);
      load_f<T, V>(z + (r + step) * C + c0, x1);
      load_f<T, V>(z + (r + 2 * step) * C + c0, x2);
      load_f<T, V>(z + (r + 3 * step) * C + c0, x3);
      welford_add(s, x0);
      welford_add(s, x1);
      welford_add(s, x2);
      welford_add(s, x3);
    }
    for (; r < a.M; r += step) {
      float x[V];
      load_f<T, V>(z + r * C + c0, x);
      welford_add(s, x);
    }
  }
  block_reduce<V, true>(s, sh);
  if (!grid_reduce<V, true>(s, sh, c0, C, a.staging, a.counters)) return;
  if (threadIdx.y != 0) return;
  const float n = s.n;  // == M
  const float unbias = n / fmaxf(n - 1.f, 1.f);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int c = c0 + v;
    if (c >= C) continue;
    const float mean = s.a[v];
    // Biased: used to normalise. Clamped at 0 without fmaxf, which would turn a NaN M2 (NaN or inf
    // in z) into 0 and leave invstd and running_var finite where the reference gives NaN.
    const float m2n = s.b[v] / n;
    const float var = m2n < 0.f ? 0.f : m2n;
    a.mean[c] = mean;
    a.invstd[c] = rsqrtf(var + a.eps);
    if (a.running_mean != nullptr) {
      const float m = a.momentum;
      a.running_mean[c] = (1.f - m) * a.running_mean[c] + m * mean;
      a.running_var[c] = (1.f - m) * a.running_var[c] + m * (var * unbias);
    }
  }
}

}  // namespace

cudaError_t launch_bn_stats(const StatsArgs& a, const ReducePlan& plan, cudaStream_t stream) {
  if (!plan_ok(plan, a.dt, a.M, a.C) || (plan.vec > 1 && !aligned16(a.z))) return cudaErrorInvalidValue;
  const dim3 block(plan.bx, plan.by), grid(plan.gx, plan.gy);
  FASTRES_REDUCE_CASES(bn_stats_kernel, a)
  return cudaGetLastError();
}

}  // namespace fastres
