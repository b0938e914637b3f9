"""Build of tgem's optional native attention kernel (metadata lives in pyproject.toml).

The extension ``tgem._tgem_kernels`` is plain C (``tgem/_csrc``) with no link to PyTorch; it is
compiled for the baseline architecture and picks AVX-512 / AVX2+FMA / scalar code at run time.
It is optional: when it cannot be built (no compiler, ``CC=false``, an unsupported platform) the
installation still succeeds and tgem runs on its pure-PyTorch exact path.
"""

import logging

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

logger = logging.getLogger("tgem.setup")

UNIX_FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fvisibility=hidden", "-pthread"]


class OptionalBuildExt(build_ext):
    """Compile with flags suited to the compiler; never fail the install on a build error."""

    def build_extension(self, ext):
        if self.compiler.compiler_type in ("unix", "mingw32", "cygwin"):
            ext.extra_compile_args = UNIX_FLAGS
            ext.extra_link_args = ["-pthread"]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any failure means: no native kernel
            logger.warning(
                "tgem: native attention kernel not built (%s); tgem will use its "
                "pure-PyTorch exact path.",
                exc,
            )


setup(
    ext_modules=[
        Extension(
            "tgem._tgem_kernels",
            sources=["tgem/_csrc/tgem_kernels.c", "tgem/_csrc/tree.c", "tgem/_csrc/module.c"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
