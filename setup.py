from pathlib import Path

from setuptools import find_packages, setup

# NVIDIA DALI publishes one wheel per CUDA major version, and an extra cannot see which CUDA the
# installed torch was built for (torch.version.cuda): `dali` is the CUDA 13 build (torch's cu130
# wheels), `dali-cuda12` the CUDA 12 one; train.py names the one that matches when DALI is missing.
DALI = "nvidia-dali-cuda130>=1.51.2; platform_system == 'Linux'"
DALI_CUDA12 = "nvidia-dali-cuda120>=1.40; platform_system == 'Linux'"

setup(
    name="preresnet",
    version="0.1.0",
    description="Pre-activation ResNets and Wide ResNets on CIFAR, with the papers' recipes and fused Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # the Triton kernels are the subpackage preresnet.kernels: no generic top-level name (the
    # Hugging Face `kernels` package on PyPI imports as `kernels`)
    packages=find_packages(include=["preresnet", "preresnet.*"]),
    # measured per GPU: which layers leave the Triton kernel
    package_data={"preresnet.kernels": ["conv_paths.json"],
                  # per GPU: the loader --loader auto takes; the pretrained weights registry (preresnet/pretrained.py)
                  "preresnet": ["gpu_defaults.json", "weights/*.json", "weights/*.pt", "weights/*.md", "weights/*.png"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "pillow>=9.0",
        "tqdm>=4.60",
        "matplotlib>=3.6",
    ],
    # the commands beside the checkout's train.py and eval.py, which a wheel does not carry
    entry_points={"console_scripts": ["preresnet-train = preresnet.train_cli:cli",
                                      "preresnet-eval = preresnet.evaluate_cli:cli"]},
    extras_require={
        # NVIDIA DALI runs the augmentation pipeline on the GPU (and on the CPU in tests); the torch
        # loader gives the same batches without it. Its wheels are for Linux only.
        "dali": [DALI],
        "dali-cuda12": [DALI_CUDA12],
        # the tests run DALI's CPU pipeline, which either build has; CI's install time is measured with this one
        "dev": ["pytest>=7.0", "pytest-xdist>=3.2", "pytest-benchmark>=4.0", DALI_CUDA12],
    },
)
