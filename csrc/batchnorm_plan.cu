// Launch configuration of the BatchNorm kernels of fastres._C: the reduction plan (plan_reduction,
// declared in batchnorm_kernels.h) and the grids of the elementwise kernels (batchnorm_common.cuh).
#include <atomic>
#include <cstdint>

#include "batchnorm_common.cuh"

namespace fastres {
namespace detail {
namespace {

int sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = 0;
  if (dev >= 0 && dev < 64) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    cudaGetLastError();  // clear it: a fallback grid size is fine
    n = 80;
  }
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

}  // namespace

void plan_2d(int64_t M, int groups, dim3& block, dim3& grid) {
  const int bx = pow2_at_least(groups, 32);
  const int by = kThreads / bx;
  const int64_t gx = ceil_div(groups, bx);
  int64_t gy = ceil_div(8LL * sm_count(), gx);
  gy = gy < ceil_div(M, by) ? gy : ceil_div(M, by);
  gy = gy < kMaxGridY ? gy : kMaxGridY;
  block = dim3(bx, by);
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy > 0 ? gy : 1));
}

unsigned plan_1d(int64_t chunks) {
  int64_t g = ceil_div(chunks, kThreads);
  const int64_t cap = 8LL * sm_count();
  return static_cast<unsigned>(g < cap ? (g > 0 ? g : 1) : cap);
}

bool plan_ok(const ReducePlan& plan, DType dt, int64_t M, int C) {
  return (plan.vec == 1 || plan.vec == 16 / elem_size(dt)) && M >= 1 && C >= 1 &&
         plan.bx * plan.by == kThreads && plan.gx >= 1 && plan.gy >= 1 && plan.gy <= kMaxGridY &&
         (plan.vec == 1 || C % plan.vec == 0) && static_cast<int64_t>(plan.gx) * plan.bx * plan.vec >= C &&
         static_cast<int64_t>(plan.gy - 1) * plan.by < M;
}

}  // namespace detail

ReducePlan plan_reduction(int64_t M, int C, DType dt, bool aligned) {
  using namespace detail;
  ReducePlan p{};
  const int wide = 16 / elem_size(dt);
  p.vec = aligned && C % wide == 0 ? wide : 1;
  const int groups = C / p.vec;  // exact on the vector path; C on the scalar path
  p.bx = pow2_at_least(groups, 32);
  p.by = kThreads / p.bx;
  const int64_t gx = ceil_div(groups, p.bx);
  // About 4 blocks per SM in all, each thread taking at least ~4 rows, every block some rows.
  int64_t gy = ceil_div(4LL * sm_count(), gx);
  const int64_t gy_rows = ceil_div(M, 4LL * p.by);
  gy = gy < gy_rows ? gy : gy_rows;
  gy = gy < kMaxGridY ? gy : kMaxGridY;
  p.gx = static_cast<int>(gx);
  p.gy = static_cast<int>(gy > 0 ? gy : 1);
  p.staging_floats = 2LL * p.gy * C + static_cast<int64_t>(p.gx) * p.gy;
  p.counters = p.gx;
  return p;
}

}  // namespace fastres
