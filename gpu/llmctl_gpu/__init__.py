"""What llmctl's CUDA and ROCm plugins share through torch's ``cuda`` API (on ROCm builds HIP devices are torch
"cuda" devices, ``torch.cuda.CUDAGraph`` records hipGraphs and the "nccl" backend is RCCL):

- ``platform``: ``TorchCudaPlatform``, the platform base (memory, dtypes, configure, the KV-cache and
  decode-graph seams); each plugin subclasses it to detect its hardware;
- ``profile``: KV-cache sizing by measuring the worst step's peak memory;
- ``graph_runner``: ``CudaGraphRunner``, decode steps captured per padded batch size and replayed;
- ``communicator``: ``GpuCommunicator``, torch.distributed on NCCL/RCCL;
- ``hooks``: ``GpuPluginHooks``, the plugin hooks both plugins parameterise.

The Triton kernels themselves live in ``llmctl_triton``. Nothing here is imported by core.
"""
