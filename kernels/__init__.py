"""Triton kernels and their launchers, one module per scan family.

Nothing here knows about autograd: each launcher takes tensors and returns
tensors, and ``linrec``'s ops wire them into ``torch.library``. Every module
lists the kernel specialisations its launchers use in ``aot_specs()`` so CI can
compile them ahead of time for real GPU targets (the CPU interpreter accepts
code that the GPU compiler rejects). ``config_override`` lets the environment change a
launcher's tile sizes and warps (``LINREC_<FAMILY>_CONFIG``) for tuning on a GPU.

``device_model`` is what the launchers plan with: the CUDA device's properties, or under the
CPU interpreter a named GPU (``LINREC_DEVICE_MODEL=h100``) so that the interpreter runs the
plan that GPU would run (tiles, warps, chunks, grid), e.g. to count its memory
traffic with ``python -m bench.traffic``.
"""

import os
from dataclasses import dataclass
from typing import Optional

CONFIG_ENV = "LINREC_{family}_CONFIG"


def tl_accumulation_dtype(dtype):
    """The Triton dtype a kernel accumulates in for tensors of torch ``dtype``: fp64 for
    float64 / complex128 (the checks' dtypes), fp32 for everything else (complex tensors
    reach the kernels as real views)."""
    import torch
    import triton.language as tl

    from linrec._common import accumulation_dtype
    return tl.float64 if accumulation_dtype(dtype).to_real() == torch.float64 else tl.float32


def config_override(family: str, cfg: dict, tunable) -> dict:
    """``cfg`` with the launch settings named in ``LINREC_<FAMILY>_CONFIG`` replaced.

    For tuning on a GPU without editing code, e.g.
    ``LINREC_DIAGONAL_CONFIG="BLOCK_T=16,num_warps=8" python -m bench diagonal --full``.
    Only the ``tunable`` settings can be set (tile sizes and warps: the results do not depend
    on them); integers are parsed as integers, anything else stays a string. An unknown or
    malformed setting raises ValueError naming the variable.
    """
    var = CONFIG_ENV.format(family=family.upper())
    text = os.environ.get(var, "").strip()
    if not text:
        return cfg
    out = dict(cfg)
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in tunable:
            raise ValueError(f"{var}={text!r}: {item.strip()!r} is not KEY=VALUE with KEY one of {sorted(tunable)}")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def config_overrides_in_use() -> str:
    """The ``LINREC_*_CONFIG`` variables set in this process, as ``NAME=VALUE`` joined by spaces."""
    return " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                    if k.startswith("LINREC_") and k.endswith("_CONFIG") and v.strip())


DEVICE_MODEL_ENV = "LINREC_DEVICE_MODEL"


@dataclass(frozen=True)
class DeviceModel:
    """The device properties a launcher's plan may depend on.

    Attributes:
        name: the device's name.
        sm_count: streaming multiprocessors.
        smem_per_block: shared memory one program may use, bytes (the opt-in maximum).
        smem_per_sm: shared memory per multiprocessor, bytes.
        l2_bytes: L2 cache, bytes.
        capability: (major, minor) compute capability.
    """

    name: str
    sm_count: int
    smem_per_block: int
    smem_per_sm: int
    l2_bytes: int
    capability: tuple


# Published figures (CUDA occupancy tables; cudaDeviceProp of these parts).
DEVICE_MODELS = {
    "h100": DeviceModel("NVIDIA H100 80GB HBM3", sm_count=132, smem_per_block=232448, smem_per_sm=233472,
                        l2_bytes=50 * 2**20, capability=(9, 0)),
    "h200": DeviceModel("NVIDIA H200", sm_count=132, smem_per_block=232448, smem_per_sm=233472,
                        l2_bytes=50 * 2**20, capability=(9, 0)),
    "a100": DeviceModel("NVIDIA A100-SXM4-80GB", sm_count=108, smem_per_block=166912, smem_per_sm=167936,
                        l2_bytes=40 * 2**20, capability=(8, 0)),
}


def device_model(device=None) -> Optional[DeviceModel]:
    """The GPU a launcher plans for: ``device``'s own properties when it is a CUDA device,
    else the model named by ``LINREC_DEVICE_MODEL`` (``h100``, ``h200``, ``a100``), else None
    (the interpreter's own plan: small tiles, no time-parallel split).

    An unknown name raises ValueError naming the variable and the known models.
    """
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch
        props = torch.cuda.get_device_properties(device)
        per_sm = getattr(props, "shared_memory_per_multiprocessor", 0)
        return DeviceModel(props.name, props.multi_processor_count,
                           getattr(props, "shared_memory_per_block_optin", per_sm), per_sm,
                           getattr(props, "L2_cache_size", 0), (props.major, props.minor))
    name = os.environ.get(DEVICE_MODEL_ENV, "").strip().lower()
    if not name:
        return None
    if name not in DEVICE_MODELS:
        raise ValueError(f"{DEVICE_MODEL_ENV}={name!r}: not a known device model; "
                         f"known: {', '.join(sorted(DEVICE_MODELS))}")
    return DEVICE_MODELS[name]
