"""Build fastattr's compiled kernels.

- ``fastattr._C``: C++17 + OpenMP CPU kernels, always built.
- ``fastattr._cuda``: CUDA kernels, built when nvcc is found. ``FASTATTR_CUDA=auto`` (default:
  build when nvcc is there, skip with a recorded reason when it is not or the build fails),
  ``1`` (must build), ``0`` (skip). ``FASTATTR_CUDA_ARCHS`` (default ``80;90``) picks the
  SASS targets; PTX of the newest one is embedded for later GPUs.

torch is never imported here: the build needs setuptools, wheel and pybind11 only, so
``pip install .`` works with pip's build isolation and no GPU. The CUDA kernels take raw
device pointers and a cudaStream_t, so the binary does not depend on the torch version.
"""

import json
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _cuda_mode() -> str:
    mode = os.environ.get("FASTATTR_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTATTR_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_archs():
    archs = os.environ.get("FASTATTR_CUDA_ARCHS", "80;90").replace(",", ";")
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in archs.split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math"]

cpu_ext = Pybind11Extension(
    "fastattr._C",
    sources=[
        f"{CSRC}/bindings.cpp",
        f"{CSRC}/cpu/projection.cpp",
        f"{CSRC}/cpu/projection_avx512.cpp",
        f"{CSRC}/cpu/projection_amx.cpp",
        f"{CSRC}/cpu/projection_avx2.cpp",
        f"{CSRC}/cpu/psg.cpp",
        f"{CSRC}/cpu/psg_avx512.cpp",
        f"{CSRC}/cpu/psg_avx2.cpp",
        f"{CSRC}/cpu/psg_amx.cpp",
        f"{CSRC}/cpu/curvature.cpp",
        f"{CSRC}/cpu/curvature_avx512.cpp",
        f"{CSRC}/cpu/curvature_avx2.cpp",
    ],
    include_dirs=[CSRC],
    depends=[f"{CSRC}/philox.h", f"{CSRC}/projection_types.h", f"{CSRC}/cpu/projection.h",
             f"{CSRC}/cpu/projection_impl.inc", f"{CSRC}/cpu/simd_variant.inc",
             f"{CSRC}/cpu/simd.h", f"{CSRC}/cpu/gemm_tiles.inc", f"{CSRC}/cpu/psg.h",
             f"{CSRC}/cpu/psg_impl.inc", f"{CSRC}/cpu/curvature.h",
             f"{CSRC}/cpu/curvature_impl.inc", f"{CSRC}/cpu/amx_tiles.inc"],
    extra_compile_args=CPU_FLAGS,
    extra_link_args=["-fopenmp"],
    cxx_std=17,
)

CUDA_SOURCES = [f"{CSRC}/cuda/projection.cu", f"{CSRC}/cuda/psg.cu",
                f"{CSRC}/cuda/curvature.cu"]
cuda_ext = Pybind11Extension(
    "fastattr._cuda",
    sources=[f"{CSRC}/cuda/bindings.cpp"],
    include_dirs=[CSRC],
    # the nvcc objects are linked in as extra_objects, which setuptools' up-to-date check
    # ignores: without these an edited .cu file would be recompiled but never relinked
    depends=[*CUDA_SOURCES, f"{CSRC}/cuda/common.cuh", f"{CSRC}/cuda/projection.h",
             f"{CSRC}/cuda/psg.h", f"{CSRC}/cuda/curvature.h", f"{CSRC}/philox.h",
             f"{CSRC}/projection_types.h"],
    extra_compile_args=["-O3"],
    cxx_std=17,
)


class BuildExt(build_ext):
    """build_ext that compiles .cu files with nvcc and records why CUDA was skipped."""

    def run(self):
        self.build_info = {"cuda": ""}
        super().run()
        target_dir = os.path.dirname(self.get_ext_fullpath("fastattr._C"))
        os.makedirs(target_dir, exist_ok=True)
        with open(os.path.join(target_dir, "_build_info.json"), "w", encoding="utf-8") as fh:
            json.dump(self.build_info, fh)

    def copy_extensions_to_source(self):
        self._drop_skipped()
        super().copy_extensions_to_source()

    def get_outputs(self):
        self._drop_skipped()
        return super().get_outputs()

    def _drop_skipped(self):
        # a skipped CUDA module has no file: leave it out of --inplace copies and install records
        if getattr(self, "build_info", {}).get("cuda"):
            self.extensions = [e for e in self.extensions if e.name != "fastattr._cuda"]

    def build_extension(self, ext):
        if ext.name != "fastattr._cuda":
            return super().build_extension(ext)
        mode = _cuda_mode()
        if mode == "0":
            self.build_info["cuda"] = "disabled by FASTATTR_CUDA=0"
            return None
        nvcc = _find_nvcc()
        if nvcc is None:
            if mode == "1":
                raise SystemExit("FASTATTR_CUDA=1 but nvcc was not found (set CUDA_HOME)")
            self.build_info["cuda"] = "nvcc not found at build time (set CUDA_HOME, reinstall)"
            return None
        try:
            self._compile_cuda(ext, nvcc)
            return super().build_extension(ext)
        except (subprocess.CalledProcessError, OSError) as exc:
            if mode == "1":
                raise
            self.build_info["cuda"] = f"CUDA build failed: {exc}"
            print(f"fastattr: skipping fastattr._cuda ({exc})", file=sys.stderr)
            return None

    def _compile_cuda(self, ext, nvcc):
        obj_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(obj_dir, exist_ok=True)
        objects = []
        for src in CUDA_SOURCES:
            obj = os.path.join(obj_dir, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", f"-I{CSRC}",
                   "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", *_cuda_archs()]
            print(" ".join(cmd))
            subprocess.check_call(cmd, cwd=HERE)
            objects.append(obj)
        cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        libdirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
        ext.extra_objects = objects
        ext.library_dirs = [d for d in libdirs if os.path.isdir(d)]
        # static cudart: the module needs only the driver at run time
        ext.libraries = ["cudart_static", "dl", "rt", "pthread"]


setup(ext_modules=[cpu_ext, cuda_ext], cmdclass={"build_ext": BuildExt})
