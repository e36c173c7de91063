"""Installs the repository's top-level folders as subpackages of the single `beit3` namespace."""

from setuptools import setup

SUBPACKAGES = {
    "beit3": "beit3",
    "beit3.pretrain": "pretrain",
    "beit3.tokenizers": "tokenizers",
    "beit3.data_pipeline": "data_pipeline",
    "beit3.launch": "launch",
    "beit3.launch.ray": "launch/ray",
}

setup(
    name="beit3-pretrain",
    version="0.1.0",
    description="Pretraining system for BEiT-3, the Multiway Transformer trained by masked data modeling",
    python_requires=">=3.10",
    packages=list(SUBPACKAGES),
    package_dir=SUBPACKAGES,
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "timm>=1.0",
        "deepspeed>=0.15",
        "webdataset>=0.2.86",
        "sentencepiece>=0.2.3",
        "protobuf",
        "zstandard",
        "pillow",
        "numpy",
        "boto3",
        "mlflow>=2.16",
        # 2.64 drops the retry settings the data build passes to Dataset.map (no named form exists yet)
        "ray[data,default]>=2.30,<2.64",
        "pydantic>=2.6",
        "pyyaml",
        "safetensors",
        "tqdm",
        "matplotlib",
        "psutil",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "filelock>=3.12",
            "setuptools>=70.1",
            "tokenizers",
            "transformers>=4.40",
            "moto[server]>=5",
        ],
    },
    entry_points={"console_scripts": ["beit3 = beit3.cli:run"]},
)
