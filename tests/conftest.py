"""Shared pytest fixtures: where the reference fixtures live and the regenerated seed-0 reference inputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MVFA_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
sys.path.insert(0, str(REPO))


def require_reference() -> Path:
    """Skip the calling test, with a one-line reason, when ../shared/reference is not beside the checkout."""
    if not (REFERENCE / "goldens_seed0.pt").is_file():
        # CI lays shared/ beside the clone: a missing fixture is a failure there
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"reference fixtures not found at {REFERENCE} (set MVFA_SHARED to the shared/ folder)"
            )
        pytest.skip(f"reference fixtures not found at {REFERENCE} (set MVFA_SHARED to the shared/ folder)")
    return REFERENCE


@pytest.fixture(scope="session")
def goldens():
    import torch

    return torch.load(require_reference() / "goldens_seed0.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="session")
def reference_assets(tmp_path_factory) -> Path:
    """The seed-0 reference inputs (weights, adapters, data, support lists), regenerated once per session.

    MVFA_ASSETS=DIR reuses a folder made earlier with the two scripts of ../shared/reference.
    """
    ref = require_reference()
    cached = os.environ.get("MVFA_ASSETS")
    if cached and (Path(cached) / "CLIP/ckpt/ViT-L-14-336px.pt").is_file():
        return Path(cached)
    out = tmp_path_factory.mktemp("reference_assets")
    subprocess.run(
        [sys.executable, str(ref / "make_ckpts.py"), str(out), "0"], check=True, capture_output=True
    )
    subprocess.run(
        [sys.executable, str(ref / "make_synth_bmad.py"), str(out), "6", "0"], check=True, capture_output=True
    )
    return out


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never reach the network: a connection to anything but this machine raises (tools/download.py's
    tests serve their files from 127.0.0.1)."""
    import ipaddress
    import socket

    connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "localhost":
            try:
                remote = not ipaddress.ip_address(address[0].split("%")[0]).is_loopback
            except ValueError:  # a host name
                remote = True
            if remote:
                raise ConnectionRefusedError(f"no network in tests: connection to {address} refused")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
