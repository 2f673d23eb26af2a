"""Triton kernels and their launchers, one module per scan family.

Nothing here knows about autograd: each launcher takes tensors and returns
tensors, and ``linrec``'s ops wire them into ``torch.library``. Every module
lists the kernel specialisations its launchers use in ``aot_specs()`` so CI can
compile them ahead of time for real GPU targets (the CPU interpreter accepts
code that the GPU compiler rejects). ``config_override`` lets the environment change a
launcher's tile sizes and warps (``LINREC_<FAMILY>_CONFIG``) for tuning on a GPU.
"""

import os

CONFIG_ENV = "LINREC_{family}_CONFIG"


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
