"""Installs the pure-Python package; compiles the CUDA extension only when it can.

The extension (csrc/) builds when a CUDA toolkit and a CUDA build of PyTorch are present and
SVDKERN_BUILD_EXT is not 0. Otherwise the install says why it skipped and never fails: every op
has a PyTorch fallback.
"""
import os
import sys

from setuptools import find_packages, setup


def cuda_extension():
    if os.environ.get("SVDKERN_BUILD_EXT", "1") == "0":
        return [], "SVDKERN_BUILD_EXT=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], "PyTorch is not installed in the build environment"
    if torch.version.cuda is None:
        return [], "this PyTorch is a CPU build"
    if CUDA_HOME is None:
        return [], "no CUDA toolkit (nvcc) found"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # bf16 tensor cores need sm_80
    ext = CUDAExtension(
        "svdkern._C",
        ["csrc/bindings.cpp", "csrc/gram.cu", "csrc/whiten.cu"],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], BuildExtension


ext_modules, build_ext = cuda_extension()
cmdclass = {}
if ext_modules:
    cmdclass["build_ext"] = build_ext
else:
    print(f"svdkern: skipping the CUDA extension ({build_ext}); PyTorch fallbacks will be used",
          file=sys.stderr)

TRITON = "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"

setup(
    name="svdkern",
    version="0.1.0",
    description="Low-rank compression of LLMs (SVD-LLM family) with fused kernels",
    packages=find_packages(include=["svdkern", "svdkern.*"]),
    package_data={"svdkern.backends": ["configs/*.json"],  # tuned kernel configs per GPU
                  "svdkern": ["wikitext2/*"]},  # the WikiText-2 files the defaults read (CC BY-SA 3.0)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors",
        "accelerate",
        "gguf",
        "tqdm",
        "datasets",
    ],
    # CUDA builds of torch bring Triton; on a CPU-only install it only serves the interpreter path
    extras_require={
        "triton": [TRITON],
        "eval": ["lm-eval==0.4.13"],  # zero-shot tasks (svdkern eval --tasks)
        "plot": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "matplotlib", TRITON],
    },
    entry_points={"console_scripts": ["svdkern=svdkern.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
