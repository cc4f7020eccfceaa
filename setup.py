"""Build script: the pure-Python package plus the C++ CPU extension ``kalman_kernels._C``.

torch must already be installed (``pip install --no-build-isolation -e .``): torch is
deliberately not a build requirement (an isolated build would download a multi-GB torch).

The extension (the ``cpp`` backend, csrc/) is built with torch.utils.cpp_extension and
ninja. Its kernels (csrc/cpu/kernels_impl.h) are compiled three times, for a baseline
x86-64 ISA, for AVX2 and for AVX-512, each with the matching ``CPU_CAPABILITY`` macro (as
PyTorch does for its own CPU kernels); the operator layer picks one at run time from
``torch.backends.cpu.get_cpu_capability()``. ``-march`` is never tuned to the build
host's own CPU: a wheel built that way dies with SIGILL on an older CPU.

Environment variables:
  KALMAN_KERNELS_REQUIRE_CPP=1  a failed extension build fails the install (CI sets it);
                                otherwise the failure is reported loudly and the
                                pure-Python package is installed without the cpp backend.
  KALMAN_KERNELS_SKIP_CPP=1     do not build the extension at all.
  MAX_JOBS=N                    parallel compile jobs (torch's ninja convention).
"""
import os
import platform
import sys
import traceback

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


REQUIRE_CPP = _flag("KALMAN_KERNELS_REQUIRE_CPP")
SKIP_CPP = _flag("KALMAN_KERNELS_SKIP_CPP")

# Flags common to every translation unit. -O3 and OpenMP (at::parallel_for is inline and
# uses `#pragma omp parallel` when torch was built with OpenMP, as the official wheels are;
# the extension then shares torch's libgomp, so torch.set_num_threads applies).
COMMON_CXX = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function",
              "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
LINK = ["-fopenmp"]

# Per-instruction-set kernel sources and flags (the same source, kernels_impl.h).
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
ISA_SOURCES = [("csrc/cpu/kernels_default.cpp", ["-DCPU_CAPABILITY=DEFAULT",
                                                 "-DCPU_CAPABILITY_DEFAULT"])]
if X86:
    ISA_SOURCES += [
        ("csrc/cpu/kernels_avx2.cpp", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2",
                                       "-DCPU_CAPABILITY_AVX2"]),
        ("csrc/cpu/kernels_avx512.cpp", ["-mavx512f", "-mavx512bw", "-mavx512vl",
                                         "-mavx512dq", "-mfma", "-mf16c",
                                         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]),
    ]


def _loud(msg: str) -> None:
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\n{msg}\n{bar}\n\n")
    sys.stderr.flush()


def _extensions_and_cmdclass():
    if SKIP_CPP:
        _loud("kalman_kernels: KALMAN_KERNELS_SKIP_CPP is set; the C++ extension "
              "(backend='cpp') is not built.")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing or broken
        if REQUIRE_CPP:
            raise
        _loud(f"kalman_kernels: cannot import torch.utils.cpp_extension ({exc!r}); installing "
              "the pure-Python package WITHOUT the C++ extension (backend='cpp' will be "
              "unavailable). Install torch first and use --no-build-isolation.")
        return [], {}

    class KKBuildExtension(BuildExtension):
        """BuildExtension + per-instruction-set kernel objects + a non-fatal failure mode."""

        def build_extension(self, ext):
            isa_sources = getattr(ext, "kk_isa_sources", [])
            base = ext.extra_compile_args
            base_cxx = list(base["cxx"] if isinstance(base, dict) else base)
            objects = []
            for src, flags in isa_sources:
                # One compile call per instruction set (each has its own flags); the
                # wrapped compiler is torch's ninja compile, so headers are tracked.
                objects += self.compiler.compile(
                    [src], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs={"cxx": base_cxx + flags, "nvcc": [], "sycl": []},
                    depends=ext.depends)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:
                if REQUIRE_CPP:
                    raise
                traceback.print_exc()
                _loud("kalman_kernels: building the C++ extension kalman_kernels._C FAILED "
                      f"({type(exc).__name__}: {exc}).\nThe pure-Python package is installed "
                      "anyway; backend='cpp' is unavailable and kk.backend_errors()['cpp'] says "
                      "why.\nSet KALMAN_KERNELS_REQUIRE_CPP=1 to make this an error.")
                self.extensions = []

        def copy_extensions_to_source(self):
            if self.extensions:
                super().copy_extensions_to_source()

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    headers = [os.path.join("csrc", f) for f in ("kk_math.h", "kk_kernels.h")]
    headers.append(os.path.join("csrc", "cpu", "kernels_impl.h"))
    # The per-ISA kernel files are compiled by KKBuildExtension, not listed as sources;
    # naming them here puts them in source distributions too.
    headers += [src for src, _ in ISA_SOURCES]
    ext = CppExtension(
        name="kalman_kernels._C",
        sources=["csrc/ops.cpp"],
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("KK_HAVE_X86_KERNELS", "1")] if X86 else [],
        extra_compile_args={"cxx": list(COMMON_CXX)},
        extra_link_args=list(LINK),
        depends=headers,
    )
    ext.kk_isa_sources = ISA_SOURCES
    return [ext], {"build_ext": KKBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
