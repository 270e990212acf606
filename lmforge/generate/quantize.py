"""Faster CPU decoding: int8 weights for the linear layers."""

from __future__ import annotations

import torch

from lmforge.errors import LMForgeError


def quantize_int8(model):
    """A copy of ``model`` for fast decoding on CPUs: every ``nn.Linear`` (the output head included)
    becomes PyTorch's dynamically quantized int8 linear layer, with int8 weights per output channel
    and activations quantized on the fly at each call (fbgemm / x86 kernels).

    Decoding is bound by reading the weights, and int8 weights are a quarter of float32's bytes:
    on a CPU without fast bf16 matmuls this is the fastest way to sample. Outputs are close to
    float32's but not equal, so greedy continuations can differ; embeddings stay float32.
    """
    import copy
    import warnings

    import torch.nn as nn

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise LMForgeError("this PyTorch build has no dynamic int8 quantization; decode in float32 instead") from None
    if next(model.parameters()).device.type != "cpu":
        raise LMForgeError("int8 quantization runs on the CPU only; move the model to the CPU or keep float32 on GPUs")
    from lmforge.model.layers import Linear

    model = copy.deepcopy(model).float().eval()
    for module in model.modules():
        if type(module) is Linear:  # torch's converter takes exactly nn.Linear; the subclass only adds a route
            module.__class__ = nn.Linear
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
