"""Triton kernels (installed as fastres.kernels), one op per module, Liger-Kernel style: the
kernels, a plain launcher and the torch.library registration (fake + autograd) side by side.

- augment: uint8 NHWC batch (or gather by index) -> crop + flip + normalise -> float, one pass.
- batchnorm: BatchNorm statistics (train) and fused BN + residual add + ReLU, forward/backward.
- conv: implicit-GEMM convolution whose epilogue yields BatchNorm's statistics.
- model: TritonResNet, the eager ResNet's modules with a forward on these ops.
- _common: where Triton can run, triton_op vs custom_op registration, poisoned allocation.

Importing a kernel module fixes interpreter mode: set TRITON_INTERPRET=1 before it to run the
kernels on the CPU. The choice between these kernels and eager PyTorch, and the error where
Triton cannot run, are fastres.kernels.choice's.
"""
