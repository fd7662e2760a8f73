"""Build tckernels._C with CMake.

Environment variables:
  TCK_CUDA        auto (default) | 1 | 0   build the CUDA kernels when nvcc is found / always / never
  TCK_CUDA_ARCHS  CMake CUDA architectures (default "80;90")
  TCK_BUILD_TYPE  Release (default) | Debug | RelWithDebInfo
  TCK_NO_NATIVE   1 to skip the native build entirely (pure-Python install, reference backend only)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("TCK_BUILD_TYPE", "Release")
        cuda = os.environ.get("TCK_CUDA", "auto").lower()
        if cuda not in ("auto", "0", "1"):
            raise ValueError(f"TCK_CUDA must be auto, 0 or 1, got {cuda!r}")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DTCK_CUDA={cuda}",
            f"-DTCK_CUDA_ARCHS={os.environ.get('TCK_CUDA_ARCHS', '80;90')}",
        ]
        try:
            import ninja  # noqa: F401

            args += ["-G", "Ninja"]
        except ImportError:
            pass
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


ext_modules = [] if os.environ.get("TCK_NO_NATIVE") == "1" else [CMakeExtension("tckernels._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
