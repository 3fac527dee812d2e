"""The package build's one extra step: compile pycni's native shim (setup.cfg holds all the metadata).

`pycni install` puts a small executable in front of every plugin that hands
the request to `pycni agent` (the warm path). The default one is compiled C
(pycni/agent/native_shim.c): it starts in well under a millisecond, where a
Python shim pays an interpreter start on every call. Like a C extension, it is
built when the package is built, so a wheel carries it and `pip install` (or
`pip install -e .`) on a machine with a C compiler builds it:

- ``build_shim`` is a sub-command of ``build``: it compiles native_shim.c with
  the compiler setuptools uses for extensions ($CC, $CFLAGS and $LDFLAGS
  apply) into ``pycni/agent/pycni-shim`` inside the build tree, or inside the
  source tree for an editable install;
- the binary records which source it was built from (``PYCNI_SHIM_SOURCE``,
  the SHA-256 of native_shim.c), so `pycni install` never copies a stale one;
- without a compiler the build still succeeds and says so: the package then
  has the Python shim only, and `pycni install` compiles the shim itself when
  it finds a compiler, or installs the Python shim and says what that costs.

Because the wheel holds a Linux executable, it is tagged for the platform
(``ShimDistribution``, ``bdist_wheel_for_platform``: py3-none-linux_x86_64
and the like), not as pure Python.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.dist import Distribution
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools before 70.1: the wheel package's
    from wheel.bdist_wheel import bdist_wheel

SOURCE = os.path.join("pycni", "agent", "native_shim.c")
BINARY = os.path.join("pycni", "agent", "pycni-shim")
# Keep in step with pycni.install.build_native_shim, the same build at install time.
EXTRA_CFLAGS = ["-O2"]


def source_digest(path: str) -> str:
    """What native_shim.c's IDENT records: the first 16 hex digits of the source's SHA-256."""
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


class build_shim(Command):
    """Compile pycni/agent/native_shim.c into the executable pycni/agent/pycni-shim."""

    description = "compile pycni's native shim (pycni/agent/native_shim.c) into pycni/agent/pycni-shim"
    user_options = [
        ("build-lib=", "b", "directory the package is built in"),
        ("build-temp=", "t", "directory for the object file"),
        ("inplace", "i", "put the binary into the source tree (what an editable install uses)"),
    ]
    boolean_options = ["inplace"]

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.build_temp: str | None = None
        self.inplace = False
        self.editable_mode = False  # set by setuptools' editable_wheel
        self.outputs: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"), ("build_temp", "build_temp"))
        if self.editable_mode:
            self.inplace = True

    def _target(self) -> str:
        return BINARY if self.inplace else os.path.join(self.build_lib, BINARY)

    def run(self) -> None:
        # Through the name setuptools.errors uses too (setuptools' own copy unless SETUPTOOLS_USE_DISTUTILS=stdlib),
        # so that the errors caught below are the ones this compiler raises.
        from distutils.ccompiler import new_compiler
        from distutils.sysconfig import customize_compiler

        target = self._target()
        temp = f"{target}.{os.getpid()}.tmp"
        digest = source_digest(SOURCE)
        compiler = new_compiler(force=True)  # one small file: always built again, never judged by mtimes
        customize_compiler(compiler)
        try:
            objects = compiler.compile(
                [SOURCE],
                output_dir=self.build_temp,
                macros=[("PYCNI_SHIM_SOURCE", f'"{digest}"')],
                extra_postargs=EXTRA_CFLAGS,
            )
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            compiler.link_executable(objects, os.path.basename(temp), output_dir=os.path.dirname(target) or ".")
        except (CCompilerError, CompileError, LinkError, ExecError, PlatformError, OSError) as exc:
            if os.path.lexists(temp):
                os.unlink(temp)
            self._without_compiler(exc, " ".join(compiler.compiler_so[:1]) or "cc")
            return
        os.chmod(temp, 0o755)
        os.replace(temp, target)
        self.outputs = [target]
        print(f"pycni: built the native shim {target} from {SOURCE} (source {digest})", file=sys.stderr, flush=True)

    def _without_compiler(self, exc: BaseException, compiler: str) -> None:
        """Say why there is no compiled shim, on stderr where a build's output goes; the build goes on."""
        found = shutil.which(compiler) is not None
        why = " ".join(str(exc).split()) or type(exc).__name__
        print(
            f"pycni: WARNING: the native shim was not built: {why} (C compiler {compiler!r} "
            f"{'found' if found else 'not found'}). The package works without it: `pycni install` "
            "compiles the shim itself where it finds a compiler, and otherwise installs the Python shim, "
            "which starts a Python interpreter on every warm call (~10 ms). Install a C compiler "
            "(Debian: apt-get install gcc libc6-dev) and rebuild to ship the compiled shim.",
            file=sys.stderr,
            flush=True,
        )

    def get_source_files(self) -> list[str]:
        return [SOURCE]

    def get_outputs(self) -> list[str]:
        return list(self.outputs)

    def get_output_mapping(self) -> dict[str, str]:
        """For an editable install: the binary in the build tree stands for the one in the source tree."""
        if not self.inplace or not self.outputs:
            return {}
        return {os.path.join(self.build_lib, BINARY): BINARY}


class build_with_shim(build):
    sub_commands = [*build.sub_commands, ("build_shim", None)]


class ShimDistribution(Distribution):
    """A distribution with a compiled part: built under build/lib.<platform>, installed as platform files."""

    def has_ext_modules(self) -> bool:
        return True


class bdist_wheel_for_platform(bdist_wheel):
    """The wheel carries a Linux executable but no Python extension: any Python 3, this platform."""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", super().get_tag()[2]


setup(
    distclass=ShimDistribution,
    cmdclass={"build": build_with_shim, "build_shim": build_shim, "bdist_wheel": bdist_wheel_for_platform},
)
