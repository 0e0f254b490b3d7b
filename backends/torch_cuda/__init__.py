"""PyTorch backend: CUDA with bf16 autocast over fp32 master weights, or the CPU in fp32."""
