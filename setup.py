"""Build dcp_native: setuptools drives CMake (ninja generator) to build dcp_native._C.

The extension does not link libtorch or the CUDA runtime, so it builds in
seconds with a plain C++17 compiler. CMake arguments can be added through the
CMAKE_ARGS environment variable; DCP_NATIVE_BUILD_TYPE picks the build type
(Release by default). The build also makes dcp_native/_testing_fake_cudart.so,
the fake CUDA runtime the fake_cuda tests load (CMAKE_ARGS=-DDCP_NATIVE_FAKE_CUDART=OFF
skips it).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The fake CUDA runtime for the fake_cuda tests (CMake target dcp_native_fake_cudart).
FAKE_CUDART = "_testing_fake_cudart.so"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("DCP_NATIVE_BUILD_TYPE", "Release")
        # A persistent build tree keeps ninja's incremental rebuilds fast.
        build_dir = ROOT / "build" / f"cmake-{build_type.lower()}"
        build_dir.mkdir(parents=True, exist_ok=True)

        import pybind11

        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            "-GNinja",
        ]
        cmake_args += [a for a in os.environ.get("CMAKE_ARGS", "").split(" ") if a]
        cmake = _tool("cmake")
        subprocess.run([cmake, str(ROOT), *cmake_args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", "."], cwd=build_dir, check=True)

    def copy_extensions_to_source(self) -> None:
        # The fake CUDA runtime of the tests is built beside the extension; an
        # in-place build copies only the extension itself into the package.
        super().copy_extensions_to_source()
        fake = Path(self.build_lib) / "dcp_native" / FAKE_CUDART
        if fake.exists():
            shutil.copy2(fake, ROOT / "dcp_native" / FAKE_CUDART)


def _tool(name: str) -> str:
    """Prefer the cmake/ninja installed beside this Python (pip packages)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


setup(
    ext_modules=[CMakeExtension("dcp_native._C")],
    cmdclass={"build_ext": CMakeBuild},
)
