"""wanrender: a distributed, multi-GPU batch renderer for the Wan2.2 video models."""
from setuptools import find_packages, setup

# torch is pinned to a range that the 2.13.0 CPU wheel satisfies, so a CPU machine never pulls CUDA wheels;
# the GPU machines bring their own torch (2.11) and install nothing over it.
TORCH = "torch>=2.5,<2.14"

setup(
    name="wanrender",
    version="0.1.0",
    description="Distributed multi-GPU batch renderer for Wan2.2 video models",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["renderer", "renderer.*", "kernels", "kernels.*", "jobs", "jobs.*",
                                    "benchmarks", "benchmarks.*", "conf"]),
    package_data={"conf": ["*.yaml", "*/*.yaml", "safety/*.txt"]},
    install_requires=[
        TORCH,
        "numpy",
        "safetensors>=0.4",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3",
        "transformers>=4.45",
        "sentencepiece",
        "ftfy",  # the official prompt cleaning (fixes full-width punctuation before tokenizing)
        "tokenizers",
        "ray[default]>=2.30",
        "pillow",
        "ffmpeg-python==0.2.0",
        "imageio-ffmpeg>=0.5",
        "decord>=0.6; platform_machine == 'x86_64'",
        "tqdm",
        "rich",
        "matplotlib",
        "nudenet>=3.4,<4",  # output safety screen: its ONNX detector ships inside the wheel (runs offline)
        "onnxruntime",  # runs NudeNet's detector on the CPU
        "c2pa-python>=0.38,<0.39",  # signed C2PA provenance manifests in the MP4s (Rust core, offline)
        "cryptography",  # reads the studio's signing certificate and key; tests make a certificate chain
        "fastapi>=0.110",  # `wanrender serve`: the HTTP submission service
        "uvicorn>=0.29",
    ],
    extras_require={
        # triton: the Triton kernels (fused ops, ring step, FP8 attention) run in CI through Triton's interpreter
        # (TRITON_INTERPRET=1, tests/conftest.py); peft: the reference for PEFT-format LoRA loading;
        # onnx + onnxscript: the preprocessing tests export tiny stand-ins of the official ONNX checkpoints
        "test": ["pytest>=8", "hypothesis>=6", "diffusers>=0.35", "accelerate", "peft>=0.14", "onnx>=1.16",
                 "onnxscript", "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        # Animate preprocessing (wanrender prepare): detector + pose through onnxruntime, image ops through OpenCV,
        # iopath for sam2. sam2 itself pins torchvision (which would replace torch), so it is installed apart,
        # without its dependencies: SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0
        "prepare": ["onnxruntime>=1.17", "opencv-python-headless>=4.8", "iopath>=0.1.10"],
        "gpu": ["flash-attn", "xformers"],
        # DeepSpeed builds against the installed torch: pip install --no-build-isolation -e .[deepspeed]
        "deepspeed": ["deepspeed>=0.16"],
    },
    entry_points={"console_scripts": ["wanrender=renderer.cli:main"]},
)
