"""Compatibility shim: this module moved to :mod:`tgem._kernels._triton` (issue 23).

Every name of that module (private ones included) is bound here to the same object, so old
imports and pickles that name ``tgem._triton_attention`` keep working.
Setting an attribute here does not reach the real module: new code (and monkeypatching)
uses :mod:`tgem._kernels._triton`.
"""

from tgem._kernels import _triton as _module

globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
