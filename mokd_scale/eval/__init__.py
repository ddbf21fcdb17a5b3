"""Evaluation of frozen backbones: weighted k-NN and the linear probe."""
