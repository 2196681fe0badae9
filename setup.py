"""Install groupvit_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are installed
as ``groupvit_fast.kernels`` (``package_dir``), so ``kernels`` never becomes a top-level package.

Native kernels (``csrc/``) are built as a torch extension when torch is importable at build time:
a CUDAExtension when a CUDA toolkit is found (CUDA_HOME), otherwise a CPU-only CppExtension.
Set ``GROUPVIT_FAST_NO_EXT=1`` to skip the native build entirely; the package then falls back to
the Triton and reference backends.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _packages():
    pkgs = [p for p in find_packages(include=["groupvit_fast", "groupvit_fast.*"])]
    pkgs.append("groupvit_fast.kernels")
    return pkgs


def _ext_modules():
    """Build the native extension if there are sources and torch is available."""
    if os.environ.get("GROUPVIT_FAST_NO_EXT", "0") == "1":
        return [], {}
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpu_sources and not cuda_sources:
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print("groupvit_fast: torch not importable at build time, skipping native kernels",
              file=sys.stderr)
        return [], {}

    extra_cxx = ["-O3", "-fopenmp", "-std=c++20"]  # torch >= 2.10 headers need C++20
    include_dirs = [os.path.join(ROOT, "csrc")]
    # The CUDA 13 torch wheels ship the toolkit headers (cusparse.h, ...) here; without this
    # include path the torch CUDA headers fail to compile.
    try:
        import nvidia  # noqa: F401
        for base in getattr(nvidia, "__path__", []):
            for sub in ("cu13", "cu12"):
                inc = os.path.join(base, sub, "include")
                if os.path.isdir(inc):
                    include_dirs.append(inc)
    except ImportError:
        pass

    use_cuda = (bool(cuda_sources) and cpp_extension.CUDA_HOME is not None
                and os.environ.get("GROUPVIT_FAST_NO_CUDA", "0") != "1")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            name="groupvit_fast._C",
            sources=cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("GROUPVIT_FAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": extra_cxx,
                "nvcc": ["-O3", "--use_fast_math", "-std=c++20", "-Xptxas", "-v",
                         "--expt-relaxed-constexpr"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            name="groupvit_fast._C",
            sources=cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": extra_cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="groupvit_fast",
    version="0.1.0",
    description="Fast, faithful GroupViT (CVPR 2022): fused grouping kernels, DeepSpeed training, "
                "zero-shot segmentation",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
        os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=_packages(),
    package_dir={"groupvit_fast.kernels": "kernels"},
    package_data={"groupvit_fast": ["data/assets/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.1",
        "numpy",
        "pillow",
        "ftfy",
        "regex",
        "instant-clip-tokenizer",
        "tqdm",
    ],
    extras_require={
        "train": ["deepspeed>=0.14", "nvidia-dali-cuda120>=1.30", "webdataset>=0.2.86",
                  "tensorboard", "textblob", "pyyaml"],
        "gpu": ["xformers"],
        "dev": ["pytest", "pytest-timeout", "transformers>=4.30", "ninja", "pybind11"],
    },
    entry_points={
        "console_scripts": [
            "groupvit-seg=groupvit_fast.seg.cli:main",
            "groupvit-convert=groupvit_fast.convert:main",
        ],
    },
)
