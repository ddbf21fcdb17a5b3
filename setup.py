"""mokd_scale: Multi-Mode Online Knowledge Distillation at cluster scale.

install_requires states the versions the package supports; constraints.txt pins the exact
environment that `make` installs and the tests ran with.
"""
from setuptools import find_packages, setup

# Lower bounds: the oldest release with every API the package calls; docs/design.md (section 5) says
# which were tested and why each sits where it does. Upper bounds: the next major release.
RUNTIME = [
    "torch>=2.4,<3",
    "torchvision>=0.19,<1",
    "deepspeed>=0.16,<1",
    "timm>=1.0.21,<2",
    "webdataset>=0.2.86,<2",
    "pyyaml>=6.0.1,<7",
    "tensorboard>=2.14,<3",
    "safetensors>=0.4.3,<1",
]
EXTRAS = {
    # The demo's plot of loss terms and k-NN accuracy, and mokd-visualize's pictures.
    "demo": ["matplotlib>=3.7"],
    # scikit-image ships the real photos the ImageNet-shaped test fixture is built from.
    "test": ["pytest>=7.4", "scikit-image>=0.21", "matplotlib>=3.7"],
}

setup(
    name="mokd_scale",
    version="0.1.0",
    description="Multi-Mode Online Knowledge Distillation (CVPR 2023) with DeepSpeed, WebDataset and Slurm",
    python_requires=">=3.10",
    packages=find_packages(include=["mokd_scale", "mokd_scale.*"]),
    # ds_configs/ inside the package is a link to the repository's top-level ds_configs/; building a
    # wheel copies the files it points at, so an installed package carries the DeepSpeed JSONs.
    package_data={"mokd_scale": ["config/recipes/*.yaml", "ds_configs/*.json"]},
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "mokd-train = mokd_scale.train.cli:main",
        "mokd-shards = mokd_scale.tools.make_shards:main",
        "mokd-eval-knn = mokd_scale.tools.eval_knn:main",
        "mokd-eval-linear = mokd_scale.tools.eval_linear:main",
        "mokd-export = mokd_scale.tools.export:main",
        "mokd-bench = mokd_scale.tools.bench.main:main",
        "mokd-demo = mokd_scale.tools.demo:main",
        "mokd-fashion-mnist = mokd_scale.tools.prepare_fashion_mnist:main",
        "mokd-plot = mokd_scale.tools.plot_metrics:main",
        "mokd-visualize = mokd_scale.tools.visualize:main",
    ]},
)
