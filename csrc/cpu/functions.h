// The functions of fastres._cpu defined outside csrc/cpu/plan_guard.cpp (whose module table lists them all).
#pragma once
#include <Python.h>

// all_finite(x) -> bool or None: whether x (a dense CPU float32 tensor: NCHW- or channels_last-contiguous,
// the inputs a vouched frozen call takes) holds no NaN and no infinity; None for any other tensor.
// (csrc/cpu/finite.cpp)
PyObject* all_finite(PyObject*, PyObject* x);

// pooled_linear(x, weight, bias, out, isa) -> bool: out = F.linear(mean of x over (H, W), weight, bias) for
// at most 16 rows; False when it does not take the arguments (csrc/cpu/pooled_linear.cpp)
PyObject* pooled_linear(PyObject*, PyObject* args);
