/* A minimal Python module around the kernels, so that the shared library builds and installs as
 * an ordinary setuptools extension (tgem._tgem_kernels). It exposes no Python API:
 * tgem/_kernels/_native.py loads the same file with ctypes and calls the C functions of
 * tgem_kernels.c directly. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef tgem_kernels_module = {
    PyModuleDef_HEAD_INIT,
    "_tgem_kernels",
    "Native attention kernels of tgem; loaded with ctypes by tgem._native (no Python API).",
    -1,
    NULL,
};

PyMODINIT_FUNC PyInit__tgem_kernels(void) { return PyModule_Create(&tgem_kernels_module); }
