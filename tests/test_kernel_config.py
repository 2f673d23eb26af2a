"""LINREC_<FAMILY>_CONFIG: launch settings (tiles, warps) set from the environment for GPU tuning.

The settings change how the work is cut, never the result: each op run through its Triton
kernels with an override still matches the torch backend (here under the interpreter).
"""

import pytest
import torch

import linrec
from linrec.kernels import config_override, config_overrides_in_use

from conftest import DEVICE


def _diagonal(backend):
    torch.manual_seed(0)
    a, x = torch.rand(2, 37, 24, device=DEVICE), torch.randn(2, 37, 24, device=DEVICE)
    return linrec.diagonal_scan(a, x, backend=backend)


def _householder(backend):
    torch.manual_seed(0)
    q = torch.randn(1, 20, 2, 40, device=DEVICE)
    k = torch.nn.functional.normalize(torch.randn(1, 20, 2, 2, 40, device=DEVICE), dim=-1)
    v, beta = torch.randn(1, 20, 2, 2, 24, device=DEVICE), torch.rand(1, 20, 2, 2, device=DEVICE) * 2
    return linrec.householder_scan(q, k, v, beta, backend=backend)[0]


def _block_diagonal(backend):
    torch.manual_seed(0)
    A, x = torch.rand(2, 30, 6, 2, 2, device=DEVICE) * 0.5, torch.randn(2, 30, 6, 2, device=DEVICE)
    return linrec.block_diagonal_scan(A, x, backend=backend)


CASES = {
    "DIAGONAL": (_diagonal, "BLOCK_T=8,BLOCK_D=32,num_warps=2"),
    "HOUSEHOLDER": (_householder, "BK=16,BV=16,num_warps=2"),
    "BLOCK_DIAGONAL": (_block_diagonal, "BLOCK_G=2,num_warps=2"),
}


def _launcher_config(family):
    """The settings each family's launcher would use here (interpreter) for the CASES shapes."""
    import linrec.kernels.block_diagonal as bd
    import linrec.kernels.diagonal as dg
    import linrec.kernels.householder as hh
    return {"DIAGONAL": lambda: dg._config(torch.float32, True, 24),
            "HOUSEHOLDER": lambda: hh._config(2, 40, 24, torch.float32, True),
            "BLOCK_DIAGONAL": lambda: bd._config(2, True)}[family]()


@pytest.mark.parametrize("family", CASES)
def test_overridden_launch_settings_give_the_same_result(family, monkeypatch):
    run, setting = CASES[family]
    expected = run("torch")
    monkeypatch.setenv(f"LINREC_{family}_CONFIG", setting)
    assert f"LINREC_{family}_CONFIG={setting}" in config_overrides_in_use()
    cfg = _launcher_config(family)
    assert all(cfg[key] == int(value) for key, value in (item.split("=") for item in setting.split(",")))
    torch.testing.assert_close(run("triton"), expected, atol=1e-5, rtol=1e-5)


def test_override_replaces_only_the_named_tunable_settings(monkeypatch):
    cfg = dict(BLOCK_T=32, BLOCK_D=64, num_warps=4)
    assert config_override("diagonal", cfg, ("BLOCK_T", "BLOCK_D", "num_warps")) == cfg
    monkeypatch.setenv("LINREC_DIAGONAL_CONFIG", " BLOCK_T = 16 , num_warps=8")
    assert config_override("diagonal", cfg, ("BLOCK_T", "BLOCK_D", "num_warps")) == \
        dict(BLOCK_T=16, BLOCK_D=64, num_warps=8)
    assert cfg == dict(BLOCK_T=32, BLOCK_D=64, num_warps=4)          # the launcher's dict is not modified


@pytest.mark.parametrize("text", ["BLOCK_X=16", "num_warps", "CT=8"])
def test_bad_override_names_the_variable(text, monkeypatch):
    monkeypatch.setenv("LINREC_HOUSEHOLDER_CONFIG", text)
    with pytest.raises(ValueError, match="LINREC_HOUSEHOLDER_CONFIG"):
        config_override("householder", dict(CT=64, BK=32, BV=32, num_warps=8), ("BK", "BV", "num_warps"))
