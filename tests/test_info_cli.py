import json
import subprocess
import sys

import velodiff
from velodiff.cli import main


def test_info_reports_native_build_and_ops():
    data = velodiff.info()
    assert data["native_module"] is True, data["native_error"]
    assert "velodiff::sampler_update" in data["ops"]
    assert data["velodiff"] == velodiff.__version__
    assert data["built_with_torch"] == data["torch"]


def test_cli_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ops"] == velodiff.info()["ops"]


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "velodiff.cli", "info"], capture_output=True, text=True, check=True)
    assert "sampler_update" in out.stdout


def test_info_lists_the_cpu_kernel_paths(monkeypatch):
    """The code path of each CPU kernel family, as chosen now: VELODIFF_CPU_ISA caps attention's."""
    paths = velodiff.info()["cpu_kernel_paths"]
    assert set(paths) == {"attention", "qgemm", "linear_attention", "fp8_gemm"}
    assert paths["attention"] in ("portable", "avx2", "avx512", "avx512bf16")
    assert paths["fp8_gemm"] in ("portable", "avx512bf16")
    monkeypatch.setenv("VELODIFF_CPU_ISA", "portable")
    assert velodiff.info()["cpu_kernel_paths"]["attention"] == "portable"
    assert velodiff.info()["cpu_kernel_paths"]["fp8_gemm"] == "portable"
    monkeypatch.setenv("VELODIFF_CPU_ISA", "avx2")
    assert velodiff.info()["cpu_kernel_paths"]["attention"] in ("portable", "avx2")
    assert velodiff.info()["cpu_kernel_paths"]["qgemm"] in ("portable", "avx2")
    monkeypatch.delenv("VELODIFF_CPU_ISA")
    assert paths["qgemm"] in ("portable", "avx2", "avx512vnni")
    monkeypatch.setenv("VELODIFF_QGEMM_SCALAR", "1")
    assert velodiff.info()["cpu_kernel_paths"]["qgemm"] == "portable"
