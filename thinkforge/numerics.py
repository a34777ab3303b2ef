"""Which machine a result came from, and CPU numerics that give the same bits on any x86 machine.

Float results on CPU depend on the kernels the libraries pick for the processor: PyTorch's own vectorised
kernels (reductions, softmax, norms) dispatch on the CPU capability (AVX-512 on one machine, AVX2 on another),
and MKL's GEMMs pick a code path per instruction set. Same seed, two machines, different last bits, and after a
few hundred training steps different models. `portable` mode pins both to their AVX2 paths, which every x86
CPU since 2013-2015 (Intel Haswell, AMD Zen) runs: ATEN_CPU_CAPABILITY=avx2, MKL's conditional numerical
reproducibility MKL_CBWR=AVX2,STRICT, and oneDNN's ISA cap ONEDNN_MAX_CPU_ISA=AVX2. The variables are read when
torch loads its kernels, so `pin` must run before `import torch` (the CLI's `--numerics` option and
`thinkforge speedrun` do); `numerics_info` says whether the pin is in effect. On this project's test machine
(AMD EPYC, AVX-512) the native and the pinned runs of the same training differ in their weights, and the
pinned run gives the same bits with 1, 2 or 4 threads (DEVELOPERS.md, "Reproducibility").
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from typing import Any

MODES = ("native", "portable")
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
KNOBS = (*PORTABLE_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS",
         "THINKFORGE_NUMERICS")
# The ISA extensions that change which kernels run (and so the last bits of float results).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    return model or platform.processor() or platform.machine(), flags


def portable_supported() -> tuple[bool, str]:
    """Portable numerics need an x86-64 CPU with AVX2 and FMA."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"portable numerics are x86-64 only (this is {platform.machine()})"
    _, flags = _cpuinfo()
    missing = [f for f in ("avx2", "fma") if f not in flags]
    return (not missing, f"this CPU lacks {', '.join(missing)}" if missing else "")


def pin(mode: str) -> str:
    """Sets the numerics mode for this process and its children; returns a note ("" when all went well).
    Must run before torch is imported: afterwards the kernels are chosen already."""
    if mode not in MODES:
        from thinkforge.errors import ThinkforgeError

        raise ThinkforgeError(f"numerics must be one of {', '.join(MODES)}, got {mode!r}")
    os.environ["THINKFORGE_NUMERICS"] = mode
    if mode == "native":
        return ""
    ok, why = portable_supported()
    if not ok:
        return why
    if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in PORTABLE_ENV.items()):
        return "torch was imported before the numerics were pinned: the pin is not in effect in this process"
    os.environ.update(PORTABLE_ENV)
    return ""


def machine_fingerprint() -> dict[str, Any]:
    """What decides the bits of a CPU result: processor, ISA flags, BLAS, kernel capability, threads, knobs.
    `id` hashes the fields that change numerics (not the host name), so two reports can be compared."""
    model, flags = _cpuinfo()
    out: dict[str, Any] = {
        "cpu": model, "arch": platform.machine(), "os": f"{platform.system()} {platform.release()}",
        "cores": os.cpu_count(), "isa": sorted(f for f in ISA_FLAGS if f in flags),
        "env": {k: os.environ[k] for k in KNOBS if k in os.environ},
    }
    torch = sys.modules.get("torch")  # never imported just to describe the machine
    if torch is not None:
        config = torch.__config__.show()
        out["torch_threads"] = torch.get_num_threads()
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["blas"] = next((part.split("=", 1)[1] for part in config.replace(",", " ").split()
                            if part.startswith("BLAS_INFO=")), "unknown")
        out["mkldnn"] = bool(torch.backends.mkldnn.is_available())
    blob = json.dumps({k: out.get(k) for k in ("cpu", "arch", "isa", "env", "torch_threads",
                                               "torch_cpu_capability", "blas")}, sort_keys=True)
    out["id"] = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return out


def numerics_info() -> dict[str, Any]:
    """The requested mode and whether it is in effect (the kernel capability torch actually dispatches to)."""
    mode = os.environ.get("THINKFORGE_NUMERICS", "native")
    info: dict[str, Any] = {"mode": mode}
    torch = sys.modules.get("torch")
    if torch is not None:
        capability = torch.backends.cpu.get_cpu_capability()
        info["cpu_capability"] = capability
        if mode == "portable":
            info["in_effect"] = capability == "AVX2" and all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items())
    return info
