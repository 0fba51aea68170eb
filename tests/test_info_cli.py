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
