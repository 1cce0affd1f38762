"""Triton kernels of fastpreact, installed as the subpackage `fastpreact.kernels`.

They know nothing of models: each file is one op (statistics, fused BN+ReLU+1x1 conv, ...), its
kernels first, then plain launcher functions. The autograd Functions live in fastpreact.functional.
"""
