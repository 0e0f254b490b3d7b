"""PyTorch backend: CUDA with bf16 autocast over fp32 master weights, or the CPU in fp32."""


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
