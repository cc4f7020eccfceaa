"""Build script: the pure-Python package plus the C++ CPU extension ``kalman_kernels._C``
and, where CUDA is available, the CUDA extension ``kalman_kernels._cuda``.

torch must already be installed (``pip install --no-build-isolation -e .``): torch is
deliberately not a build requirement (an isolated build would download a multi-GB torch).
A build that cannot import torch (pip's default isolated build) FAILS with a message that
names the fix, unless a pure-Python install was asked for (KALMAN_KERNELS_PURE_PYTHON=1).

The extension (the ``cpp`` backend, csrc/) is built with torch.utils.cpp_extension and
ninja. Its kernels (csrc/cpu/kernels_impl.h) are compiled three times, for a baseline
x86-64 ISA, for AVX2 and for AVX-512, each with the matching ``CPU_CAPABILITY`` macro (as
PyTorch does for its own CPU kernels); the operator layer picks one at run time from
``torch.backends.cpu.get_cpu_capability()``. ``-march`` is never tuned to the build
host's own CPU: a wheel built that way dies with SIGILL on an older CPU.

The CUDA extension (the ``cuda`` backend, csrc/cuda/) is built when torch is a CUDA build
and a CUDA toolkit of the same major version is found: CUDA_HOME / CUDA_PATH if set, else
the toolkit behind the ``nvcc`` on PATH (asked with ``nvcc --dryrun``, so a wrapper script
that execs the real compiler is followed), else /usr/local/cuda. No GPU is needed to
compile. Architectures: TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX" (sm_80 and sm_90
binaries, and sm_90 PTX that newer GPUs compile at load time). What was decided, and why,
is printed and recorded in kalman_kernels/_build_info.py (``kk.backend_errors()`` quotes it).

Environment variables:
  KALMAN_KERNELS_REQUIRE_CPP=1  a failed extension build fails the install (CI sets it);
                                otherwise the failure is reported loudly and the
                                pure-Python package is installed without the cpp backend.
  KALMAN_KERNELS_SKIP_CPP=1     do not build the C++ extensions at all (pure Python).
  KALMAN_KERNELS_PURE_PYTHON=1  the same, and say so when torch is not importable.
  KALMAN_KERNELS_BUILD_CUDA=1   build the CUDA extension even where the checks above say
                                no (=0: never build it).
  KALMAN_KERNELS_REQUIRE_CUDA_BUILD=1  a CUDA extension that is not built, or fails to
                                compile or link, fails the install (CI on a machine with a
                                CUDA toolkit sets it).
  MAX_JOBS=N                    parallel compile jobs (torch's ninja convention).
"""
import os
import platform
import re
import shutil
import subprocess
import sys
import traceback

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


REQUIRE_CPP = _flag("KALMAN_KERNELS_REQUIRE_CPP")
PURE_PYTHON = _flag("KALMAN_KERNELS_PURE_PYTHON")
SKIP_CPP = _flag("KALMAN_KERNELS_SKIP_CPP") or PURE_PYTHON
BUILD_CUDA = os.environ.get("KALMAN_KERNELS_BUILD_CUDA", "").strip().lower()  # "", "1", "0"
REQUIRE_CUDA = _flag("KALMAN_KERNELS_REQUIRE_CUDA_BUILD")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# setup.py commands that compile (the others only collect metadata or sources)
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop",
                  "bdist_egg", "bdist"}

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


def _say(msg: str) -> None:
    sys.stderr.write(f"kalman_kernels setup: {msg}\n")
    sys.stderr.flush()


def _compiling() -> bool:
    return any(arg in BUILD_COMMANDS for arg in sys.argv[1:])


# --------------------------------------------------------------------------------------
# Build notes: what was decided about each extension, and why (read at run time by the
# backends to explain a missing extension)
# --------------------------------------------------------------------------------------
BUILD_INFO = os.path.join(HERE, "kalman_kernels", "_build_info.py")
NOTES = {"CPP_BUILD": "", "CUDA_BUILD": ""}


def _in_place() -> bool:
    """Builds whose extensions land in the source tree (editable / --inplace): the notes go
    there too. Other builds (wheels) get them in the build tree only (KKBuildPy)."""
    args = sys.argv[1:]
    return ("--inplace" in args or "-i" in args or "develop" in args or "editable_wheel" in args
            or not os.path.exists(BUILD_INFO))


def _write_notes(*paths: str) -> None:
    text = ('"""Written by setup.py: how the compiled extensions were built (or why not)."""\n'
            + "".join(f"{key} = {value!r}\n" for key, value in NOTES.items()))
    for path in paths:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text)
        except OSError:
            pass


def _note(key: str, value: str, *extra_paths: str) -> None:
    NOTES[key] = value
    _write_notes(*(((BUILD_INFO,) if _in_place() else ()) + extra_paths))


class KKBuildPy(build_py):
    """build_py that writes this build's notes into the built package."""

    def run(self):
        super().run()
        _write_notes(os.path.join(self.build_lib, "kalman_kernels", "_build_info.py"))


# --------------------------------------------------------------------------------------
# torch not importable: fail with the fix, unless a pure-Python install was asked for
# --------------------------------------------------------------------------------------
def _torch_missing(exc: BaseException):
    msg = (f"kalman_kernels: torch cannot be imported in this build environment ({exc!r}).\n"
           "The compiled backends (cpp, cuda) are built against the torch you run with, and pip's\n"
           "default isolated build cannot see it (torch is deliberately not a build requirement:\n"
           "an isolated build would download a multi-GB torch). Install torch first, then:\n"
           "    pip install --no-build-isolation .        (or -e . for a development install)\n"
           "For a pure-Python install without the compiled backends, set\n"
           "KALMAN_KERNELS_PURE_PYTHON=1.")
    if REQUIRE_CPP:
        raise SystemExit(msg + "\n(KALMAN_KERNELS_REQUIRE_CPP is set: the C++ extension is "
                               "required.)")
    if not _compiling():  # metadata / sdist: nothing is compiled now
        _say(f"torch is not importable here ({exc!r}); fine for {sys.argv[1:]}")
        return [], {"build_py": KKBuildPy}
    raise SystemExit(msg)


# --------------------------------------------------------------------------------------
# The CUDA toolkit: CUDA_HOME / CUDA_PATH, else behind the nvcc on PATH, else /usr/local/cuda
# --------------------------------------------------------------------------------------
def _is_toolkit(root: str) -> bool:
    if not root or not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return False
    inc = [os.path.join(root, "include")]
    libs = [os.path.join(root, d) for d in ("lib64", "lib")]
    targets = os.path.join(root, "targets")
    if os.path.isdir(targets):
        for t in os.listdir(targets):
            inc.append(os.path.join(targets, t, "include"))
            libs.append(os.path.join(targets, t, "lib"))
    has_header = any(os.path.isfile(os.path.join(d, "cuda_runtime.h")) for d in inc)
    has_cudart = any(os.path.isdir(d) and any(f.startswith("libcudart.so") for f in os.listdir(d))
                     for d in libs)
    return has_header and has_cudart


def _toolkit_behind(nvcc: str) -> str:
    """The toolkit root the given nvcc runs from: nvcc's own `TOP=` (follows wrappers that
    exec the real compiler), else the folder above the resolved binary."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            m = re.match(r"#\$ TOP=(.+)$", line.strip())
            if m:
                return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvcc_version(root: str) -> str:
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"release (\d+)\.(\d+)", out)
        return f"{m.group(1)}.{m.group(2)}" if m else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _find_cuda_toolkit():
    """(root or None, how it was found or why none was)."""
    looked = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit(root):
                return os.path.realpath(root), f"{var}={root}"
            looked.append(f"{var}={root} (no bin/nvcc, cuda_runtime.h and libcudart there)")
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_behind(nvcc)
        if _is_toolkit(root):
            return root, f"the nvcc on PATH ({nvcc}) runs from {root}"
        looked.append(f"nvcc on PATH ({nvcc}) -> {root} (not a complete toolkit)")
    else:
        looked.append("no nvcc on PATH")
    if _is_toolkit("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda"), "/usr/local/cuda"
    looked.append("/usr/local/cuda (absent or incomplete)")
    return None, "no CUDA toolkit found: " + "; ".join(looked)


def _cuda_decision(torch_mod):
    """(build?, toolkit root or None, explanation)."""
    if BUILD_CUDA in ("0", "false", "no", "off"):
        return False, None, "KALMAN_KERNELS_BUILD_CUDA=0"
    forced = BUILD_CUDA in ("1", "true", "yes", "on")
    torch_cuda = torch_mod.version.cuda
    root, how = _find_cuda_toolkit()
    if torch_cuda is None and not forced:
        return False, root, (f"torch {torch_mod.__version__} is a CPU-only build (a CUDA build of "
                             f"torch is needed)")
    if root is None:
        return forced, None, how
    version = _nvcc_version(root)
    if (torch_cuda and version and version.split(".")[0] != torch_cuda.split(".")[0]
            and not forced):
        return False, root, (f"the CUDA toolkit at {root} is CUDA {version}, torch was built "
                             f"with CUDA {torch_cuda} (the major versions must match)")
    return True, root, f"CUDA {version or '?'} toolkit at {root} ({how})"


def _extensions_and_cmdclass():
    if SKIP_CPP:
        why = "KALMAN_KERNELS_PURE_PYTHON" if PURE_PYTHON else "KALMAN_KERNELS_SKIP_CPP"
        _loud(f"kalman_kernels: {why} is set; the C++ extensions (backend='cpp', "
              "backend='cuda') are not built.")
        _note("CPP_BUILD", f"not built: {why} was set")
        _note("CUDA_BUILD", f"not built: {why} was set")
        if REQUIRE_CUDA:
            raise SystemExit(f"kalman_kernels: KALMAN_KERNELS_REQUIRE_CUDA_BUILD is set but "
                             f"{why} turns the compiled extensions off")
        return [], {"build_py": KKBuildPy}
    try:
        import torch
    except Exception as exc:  # torch missing or broken
        return _torch_missing(exc)

    # The CUDA decision comes first: torch.utils.cpp_extension reads CUDA_HOME when imported.
    build_cuda, cuda_root, cuda_why = _cuda_decision(torch)
    if build_cuda and cuda_root:
        os.environ["CUDA_HOME"] = cuda_root
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    try:
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch broken
        return _torch_missing(exc)
    if build_cuda and cuda_root:
        cpp_extension.CUDA_HOME = cuda_root
    cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if build_cuda:
        _say(f"building the CUDA extension kalman_kernels._cuda: {cuda_why}; architectures "
             f"TORCH_CUDA_ARCH_LIST={cuda_archs!r}")
        _note("CUDA_BUILD", f"built with the {cuda_why}, for TORCH_CUDA_ARCH_LIST={cuda_archs!r}")
    else:
        _say(f"NOT building the CUDA extension kalman_kernels._cuda (backend='cuda'): {cuda_why}"
             f". Set KALMAN_KERNELS_BUILD_CUDA=1 (and CUDA_HOME) to force it.")
        _note("CUDA_BUILD", f"not built: {cuda_why}")
        if REQUIRE_CUDA and _compiling():
            raise SystemExit(f"kalman_kernels: KALMAN_KERNELS_REQUIRE_CUDA_BUILD is set but the "
                             f"CUDA extension is not built: {cuda_why}")
    _note("CPP_BUILD", "built")

    class KKBuildExtension(BuildExtension):
        """BuildExtension + per-instruction-set kernel objects + a non-fatal failure mode
        per extension (the C++ CPU extension and the CUDA extension fail independently)."""

        failed = ()

        def _give_up(self, ext, exc) -> None:
            """A failed extension: fatal under its REQUIRE flag, else reported and left out."""
            cuda = getattr(ext, "kk_cuda", False)
            if (REQUIRE_CUDA if cuda else REQUIRE_CPP):
                raise exc
            traceback.print_exc()
            name, backend = ((ext.name, "cuda") if cuda else (ext.name, "cpp"))
            flag = "KALMAN_KERNELS_REQUIRE_CUDA_BUILD" if cuda else "KALMAN_KERNELS_REQUIRE_CPP"
            _loud(f"kalman_kernels: building the extension {name} FAILED "
                  f"({type(exc).__name__}: {exc}).\nThe package is installed without it; "
                  f"backend={backend!r} is unavailable and kk.backend_errors()[{backend!r}] says "
                  f"why.\nSet {flag}=1 to make this an error.")
            lib_info = os.path.join(self.build_lib, "kalman_kernels", "_build_info.py")
            _note("CUDA_BUILD" if cuda else "CPP_BUILD",
                  f"the build FAILED ({type(exc).__name__}: {str(exc)[:300]})",
                  *(() if self.inplace else (lib_info,)))
            self.failed = tuple(self.failed) + (ext.name,)

        def _built(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def build_extensions(self):
            cuda_exts = [e for e in self.extensions if getattr(e, "kk_cuda", False)]
            if cuda_exts:
                # torch checks the toolkit against itself for every extension at once; a
                # failure there must only cost the CUDA extension.
                try:
                    check = getattr(cpp_extension, "_check_cuda_version", None)
                    if check is not None:
                        check(*self._check_abi())
                except Exception as exc:  # noqa: BLE001
                    for ext in cuda_exts:
                        self._give_up(ext, exc)
                    self.extensions = self._built()
            super().build_extensions()

        def build_extension(self, ext):
            try:
                self._build_one(ext)
            except Exception as exc:  # noqa: BLE001
                self._give_up(ext, exc)

        def _build_one(self, ext):
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

        def copy_extensions_to_source(self):
            built, self.extensions = self.extensions, self._built()
            try:
                if self.extensions:
                    super().copy_extensions_to_source()
            finally:
                self.extensions = built

        def get_outputs(self):
            built, self.extensions = self.extensions, self._built()
            try:
                return super().get_outputs() if self.extensions else []
            finally:
                self.extensions = built

    headers = [os.path.join("csrc", f) for f in ("kk_math.h", "kk_kernels.h", "kk_dtype.h",
                                                 "kk_checks.h")]
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
    exts = [ext]
    if build_cuda:
        exts.append(_cuda_extension(cpp_extension))
    return exts, {"build_ext": KKBuildExtension.with_options(use_ninja=True),
                  "build_py": KKBuildPy}


def _cuda_extension(cpp_extension):
    """kalman_kernels._cuda: the kernels (one nvcc translation unit, kernels.cu, no torch
    headers) and their operator layer (ops.cpp, host compiler)."""
    cuda_dir = os.path.join("csrc", "cuda")
    headers = [os.path.join("csrc", f) for f in ("kk_math.h", "kk_dtype.h", "kk_checks.h")] + [
        os.path.join(cuda_dir, f) for f in ("compat.cuh", "kernels.cuh", "launch.h", "ops_impl.h",
                                            "emulate.h", "emulated.cpp")]
    ext = cpp_extension.CUDAExtension(
        name="kalman_kernels._cuda",
        sources=[os.path.join(cuda_dir, "ops.cpp"), os.path.join(cuda_dir, "kernels.cu")],
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        depends=headers,
    )
    ext.kk_cuda = True
    return ext


if __name__ == "__main__":  # (setuptools and pip run it so; tests load the helpers above)
    ext_modules, cmdclass = _extensions_and_cmdclass()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
