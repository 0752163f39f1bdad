// fastres._cpu's finiteness test of a model call's input (csrc/cpu/finite.cpp).
#pragma once
#include <Python.h>

// all_finite(x) -> bool or None: whether x (a dense CPU float32 tensor: NCHW- or channels_last-contiguous,
// the inputs a vouched frozen call takes) holds no NaN and no infinity; None for any other tensor.
PyObject* all_finite(PyObject*, PyObject* x);
