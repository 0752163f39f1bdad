// BatchNorm kernels of fastres._C: launchers and their arguments. The kernels: batchnorm_stats.cu,
// batchnorm_apply.cu, batchnorm_backward.cu (shared device code in batchnorm_common.cuh, launch
// configuration in batchnorm_plan.cu).
//
// Only C++ and CUDA runtime types appear here, so the .cu compiles without torch headers; the host
// code (batchnorm.cpp) validates tensors, allocates, and calls these launchers on the current stream.
//
// Every data tensor is NHWC (channels_last, dense) and is seen as a row-major [M, C] matrix:
// M = N*H*W rows, C channels, element (r, c) at memory position i = r*C + c. Data is fp32, fp16 or
// bf16; per-channel vectors (mean, invstd, weight, bias, running stats, dgamma, dbeta) are fp32.
// The ReLU bit mask holds y_i > 0 in bit i % 8 of byte i / 8 (ceil(M*C/8) bytes; see
// fastres.ops.reference.pack_relu_mask).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastres {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// How a per-channel reduction (bn_stats, the sums of bn_backward) is spread over the GPU. Blocks are
// (bx, by) threads; a thread owns `vec` consecutive channels and walks rows with a grid-wide stride.
// Grid (gx, gy): gx blocks across channels, gy across rows. Each block leaves per-channel partials in
// a staging buffer; the last block of each channel column (counted with an atomic counter) merges
// them in a fixed order, so results are bitwise reproducible for a given shape and GPU.
struct ReducePlan {
  int vec;                 // channels per thread: 16 / sizeof(T) (16-byte loads) or 1 (scalar loads)
  int bx, by;              // block shape, bx * by == 256, both powers of two
  int gx, gy;              // grid shape; gy <= ceil(M / by), so every block has rows
  int64_t staging_floats;  // fp32 workspace the launch needs: 2 * gy * C partials + gx * gy counts
  int counters;            // int32 counters the launch needs (gx), zero before the launch; the last
                           // block of each column resets its counter, so they are zero after it too
};

// The plan for M rows of C channels of dtype dt (M >= 1, C >= 1) on the current device.
// aligned16: every data pointer the kernel reads is 16-byte aligned (then vec > 1 when C allows it).
ReducePlan plan_reduction(int64_t M, int C, DType dt, bool aligned16);

// bn_stats: per channel mean and invstd = 1/sqrt(biased var + eps) of z (fp32 Welford per thread,
// Chan merges), and when running_mean is given the nn.BatchNorm2d update
//   running_mean <- (1 - momentum) * running_mean + momentum * mean
//   running_var  <- (1 - momentum) * running_var  + momentum * var * M / max(M - 1, 1)
struct StatsArgs {
  const void* z;          // in:  [M, C] data, dtype dt
  int64_t M;              // rows, >= 1
  int C;                  // channels, >= 1
  DType dt;
  float* mean;            // out: [C]
  float* invstd;          // out: [C]
  float* running_mean;    // in/out: [C] fp32, or null (then running_var is null too)
  float* running_var;     // in/out: [C] fp32, or null
  float momentum, eps;
  float* staging;         // workspace: plan.staging_floats floats (any content)
  int* counters;          // workspace: plan.counters ints, zero on entry, left zero on exit
};
cudaError_t launch_bn_stats(const StatsArgs& a, const ReducePlan& plan, cudaStream_t stream);

// bn_apply: y = act((z - mean) * scale + bias (+ residual)), scale = weight * invstd (weight = 1,
// bias = 0 when null), act = ReLU or identity; the bit mask of y > 0 (of y as stored, rounded to T)
// when mask is not null. Elementwise, no workspace.
struct ApplyArgs {
  const void* z;          // in:  [M, C], dtype dt
  const void* residual;   // in:  [M, C], dtype dt, or null
  void* y;                // out: [M, C], dtype dt
  const float* mean;      // in:  [C]
  const float* invstd;    // in:  [C]
  const float* weight;    // in:  [C] or null
  const float* bias;      // in:  [C] or null
  uint8_t* mask;          // out: ceil(M*C/8) bytes, or null (no mask)
  int64_t M;
  int C;
  DType dt;
  bool relu;
};
cudaError_t launch_bn_apply(const ApplyArgs& a, cudaStream_t stream);

// bn_backward: sums of g and g * xhat per channel (deterministic, as bn_stats), then dz and dres.
// The math is derived once, in fastres/ops/reference.py; which kernel computes which sum: the top of
// batchnorm_backward.cu.
struct BackwardArgs {
  const void* grad_y;     // in:  [M, C], dtype dt: dL/dy
  const void* z;          // in:  [M, C], dtype dt: the BatchNorm input
  const uint8_t* mask;    // in:  ReLU bit mask of y (ceil(M*C/8) bytes), or null (no ReLU)
  const float* mean;      // in:  [C] the mean and invstd the forward normalised with
  const float* invstd;    // in:  [C]
  const float* weight;    // in:  [C] or null (gamma = 1)
  void* dz;               // out: [M, C], dtype dt
  void* dres;             // out: [M, C], dtype dt: g (the residual's gradient), or null
  float* dgamma;          // out: [C] sum(g * xhat)
  float* dbeta;           // out: [C] sum(g)
  float* coef;            // workspace: 3 * C floats (the per-channel coefficients of dz)
  float* staging;         // workspace: plan.staging_floats floats
  int* counters;          // workspace: plan.counters ints, zero on entry, left zero on exit
  int64_t M;
  int C;
  DType dt;
  bool training;          // batch statistics (dz has the mean/var terms) or running statistics
};
cudaError_t launch_bn_backward(const BackwardArgs& a, const ReducePlan& plan, cudaStream_t stream);

}  // namespace fastres
