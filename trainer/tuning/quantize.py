"""QLoRA's base: every linear layer of our Transformer as a frozen bitsandbytes 4-bit NF4 layer."""
from __future__ import annotations

import torch
from torch import nn


def check_qlora_available(cuda: bool, key: str = "sft") -> None:
    """bitsandbytes must be installed and able to quantize to NF4 on this device (recent releases do on CPU)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(f"{key}.method=qlora needs bitsandbytes (pip install bitsandbytes)") from None
    device = "cuda" if cuda else "cpu"
    try:
        probe = _linear4bit(nn.Linear(64, 64, bias=False), torch.float32, device)
        probe(torch.zeros(1, 64, device=device))
    except Exception as exc:  # bitsandbytes builds without a backend for this device raise many types
        raise ValueError(f"{key}.method=qlora is unsupported on {device} with bitsandbytes {bnb.__version__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def _linear4bit(linear: nn.Linear, compute_dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", quant_storage=torch.uint8)
    # Moving a Params4bit to a device is what quantizes it.
    q.weight = bnb.nn.Params4bit(linear.weight.data.float(), requires_grad=False, quant_type="nf4").to(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    return q


def quantize_linear_layers(model: nn.Module, compute_dtype: torch.dtype = torch.float32,
                           skip: tuple[str, ...] = ("output",)) -> nn.Module:
    """Replace the model's nn.Linear layers (except those named in `skip`) in place; everything is frozen."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and name not in skip]
    for parent, name, child in targets:
        setattr(parent, name, _linear4bit(child, compute_dtype, device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
