"""The command-line tools, each a module with main(argv) -> exit code, installed as console scripts:

    mokd-shards         make_shards            ImageNet folder tree -> WebDataset shards + index
    mokd-eval-knn       eval_knn               weighted k-NN of a checkpoint's teachers
    mokd-eval-linear    eval_linear            linear probe on frozen teacher features
    mokd-export         export                 a trained backbone as a timm model folder
    mokd-bench          bench.main             step / memory / data benchmarks
    mokd-demo           demo                   the CPU demo on Fashion-MNIST (`make demo`)
    mokd-fashion-mnist  prepare_fashion_mnist  Fashion-MNIST -> ImageNet-shaped folder
    mokd-plot           plot_metrics           loss terms and k-NN from metrics.jsonl
    mokd-visualize      visualize              class-token and search-head attention maps of a checkpoint
"""
