"""Packaging for nnunet-heart-ext.

Folders are import paths: every package is a folder under nnunet_heart_ext/ (kernels/,
trainers/, data/, nnunet/, pipeline/, report/), found by find_packages with no package_dir mapping. The
top-level `kernels` and `trainers` are symlinks to nnunet_heart_ext/kernels and
nnunet_heart_ext/trainers (the design card's names); the `include` filter keeps them from
becoming top-level packages.

The one-line `nnunet_heart_ext.pth` that registers the extension with nnU-Net (see
nnunet_heart_ext/_hook.py) goes into site-packages for regular and editable installs alike;
setuptools would otherwise leave it out of editable wheels.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "nnunet_heart_ext.pth"
PTH_LINE = b"import nnunet_heart_ext._hook\n"


class BuildPyWithPth(build_py):
    """Regular wheels: put the .pth at the root of build_lib, i.e. of site-packages."""

    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PTH_NAME), "wb") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


class EditableWheelWithPth(editable_wheel):
    """Editable wheels: wrap setuptools' strategy so it also writes the .pth."""

    def _select_strategy(self, name, tag, build_lib):
        strategy = super()._select_strategy(name, tag, build_lib)
        outer_call = strategy.__call__

        class WithPth(type(strategy)):
            def __call__(self, wheel, files, mapping):
                outer_call(wheel, files, mapping)
                wheel.writestr(PTH_NAME, PTH_LINE)

        strategy.__class__ = WithPth
        return strategy


setup(
    name="nnunet-heart-ext",
    version="0.1.0",
    description="nnU-Net v2 extension for AICUP 2025 CT heart segmentation: trainers, plans, "
    "Triton/Numba kernels, and a one-command pipeline",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_heart_ext", "nnunet_heart_ext.*"]),
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch!=2.9.*",
        "triton; platform_system == 'Linux'",
        "numba",
        "SimpleITK",
        "connected-components-3d",
        "isal",
        "Pillow",
    ],
    # pytest-xdist runs two test files at a time (README's test command); selenium drives Debian's Chromium in the report's browser test (tests/browser.py; .ci/run installs both)
    # openvino: the fastest CPU path of the network's passes (nnunet_heart_ext/nnunet/network_runtime.py);
    # optional, and in the test extra so that README's setup (the demo) and CI take and test it
    extras_require={"openvino": ["openvino>=2025.0"],
                    "test": ["pytest", "pytest-xdist", "selenium", "openvino>=2025.0"]},
    entry_points={"console_scripts": ["nnunet-heart = nnunet_heart_ext.cli:main"]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
