"""mokd_scale: Multi-Mode Online Knowledge Distillation at cluster scale."""
from setuptools import find_packages, setup

RUNTIME = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "deepspeed==0.19.8",
    "timm==1.0.31",
    "webdataset==1.0.2",
    "pyyaml==6.0.3",
    "tensorboard==2.21.0",
    "safetensors==0.8.0",
]
EXTRAS = {
    # The demo's plot of loss terms and k-NN accuracy.
    "demo": ["matplotlib==3.11.2"],
    # scikit-image ships the real photos the ImageNet-shaped test fixture is built from.
    "test": ["pytest==9.2.0", "scikit-image==0.26.0", "matplotlib==3.11.2"],
}

setup(
    name="mokd_scale",
    version="0.1.0",
    description="Multi-Mode Online Knowledge Distillation (CVPR 2023) with DeepSpeed, WebDataset and Slurm",
    python_requires=">=3.10",
    packages=find_packages(include=["mokd_scale", "mokd_scale.*"]),
    package_data={"mokd_scale": ["configs/*.yaml"]},
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "mokd-train = mokd_scale.train:main",
        "mokd-shards = mokd_scale.tools.make_shards:main",
        "mokd-eval-knn = mokd_scale.tools.eval_knn:main",
        "mokd-eval-linear = mokd_scale.tools.eval_linear:main",
        "mokd-export = mokd_scale.tools.export:main",
        "mokd-bench = mokd_scale.tools.bench.main:main",
        "mokd-demo = mokd_scale.tools.demo:main",
        "mokd-fashion-mnist = mokd_scale.tools.prepare_fashion_mnist:main",
        "mokd-plot = mokd_scale.tools.plot_metrics:main",
    ]},
)
