"""``velodiff info``: what this build of velodiff contains (torch is imported on call, not on import)."""
from __future__ import annotations

import platform
from typing import Any, Dict

from velodiff._version import __version__


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _cpu_isa() -> str:
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def info() -> Dict[str, Any]:
    """The build as a dict: version, torch/CUDA versions, compiled CUDA archs, CPU ISA (torch's), the code path
    each of our CPU kernel families runs here (VELODIFF_CPU_ISA caps attention's), registered ops."""
    import torch

    from velodiff.ops import _native

    build: Dict[str, Any] = {}
    if _native._C is not None:
        build = dict(_native._C.build_info())
    ops = sorted({s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("velodiff::")})
    return {
        "velodiff": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "native_module": _native._C is not None,
        "native_error": None if _native._C is not None else str(_native._LOAD_ERROR),
        "cuda_kernels": bool(build.get("cuda", False)),
        "cuda_archs": build.get("cuda_archs", ""),
        "built_with_torch": build.get("torch_version", ""),
        "openmp": bool(build.get("openmp", False)),
        "cpu_isa": _cpu_isa(),
        "cpu_kernel_paths": dict(build.get("cpu_paths", {})),
        "ops": ops,
    }
