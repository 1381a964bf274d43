"""Shared pytest fixtures: the reference fixtures kept in the repository, the regenerated seed-0 reference
inputs, and the comparison of a tensor with a probe of a reference tensor."""

import math
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# the tiny random-weight CLIP the script tests run: 56-pixel images make a 4x4 patch grid, every pass well
# under a second
SIZE = 56
TINY = [
    "--model_name",
    "demo-tiny",
    "--pretrain",
    "none",
    "--features_list",
    "3",
    "6",
    "9",
    "12",
    "--img_size",
    str(SIZE),
    "--device",
    "cpu",
]
REFERENCE = TESTS / "fixtures" / "reference"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TESTS))

from mvfa.config import ModelConfig  # noqa: E402 - importable once the repository is on the path

# the same tiny model as a config, for tests that build it in-process
TINY_MODEL = ModelConfig(model_name="demo-tiny", pretrain="none", img_size=SIZE, features_list=(3, 6, 9, 12))

SUM_NORM_RTOL = 1e-12  # float64 sums of the same values in another order


def pytest_configure(config):
    """Test workers (pytest-xdist) share the machine's cores: each worker, and every process it starts, runs
    its share of them as torch's threads, unless OMP_NUM_THREADS says otherwise. More threads than cores make
    OpenMP's waits spin: on 2 cores, 2 workers of 2 threads each took the quick tier 15 minutes, of 1 thread
    each 11. The recorded replays set their recording's thread count themselves."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        share = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread in the modules that ask for it (`pytestmark = pytest.mark.usefixtures(...)`):
    the tiny-model runs are faster so on two cores shared with another test worker."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """All six synthetic datasets (3 images per folder: 3 normal + 3 abnormal test images, a held-out pair in
    valid with --shot 2; SIZE px) and support lists for k = 1 and 2, 3 draws each."""
    from dataset.synthetic import make_synthetic_bmad

    folder = str(tmp_path_factory.mktemp("synth"))
    return make_synthetic_bmad(folder, n_per_split=3, seed=0, img_size=SIZE, shots=(1, 2))


@pytest.fixture
def reads(monkeypatch):
    """Records (module, path) for every image and mask the dataset modules read, in order."""
    import dataset.medical_few as few
    import dataset.medical_zero as zero

    log = []
    for module in (few, zero):
        for name in ("load_input", "load_mask"):
            load = getattr(module, name)

            def spy(path, *a, _load=load, _tag=module.__name__, **k):
                log.append((_tag, os.path.normpath(path)))
                return _load(path, *a, **k)

            monkeypatch.setattr(module, name, spy)
    return log


@pytest.fixture(scope="session")
def goldens() -> dict:
    """The reference's intermediate values, large tensors as probes (tests/fixtures/reference/README.md)."""
    import torch

    return torch.load(REFERENCE / "goldens_seed0_small.pt", map_location="cpu", weights_only=True)


def reference_model(assets: Path, device: str = "cpu"):
    """The reference's model on `device`: ViT-L-14-336 at 240 px from the seed-0 archive, frozen, eval mode,
    with the few-shot Brain adapters."""
    from CLIP import CLIP_Inplanted, create_model

    clip = create_model(
        "ViT-L-14-336", 240, "openai", device, checkpoint=assets / "CLIP/ckpt/ViT-L-14-336px.pt"
    )
    clip.requires_grad_(False)
    model = CLIP_Inplanted(clip).to(device).eval()
    model.load_adapters(assets / "ckpt/few-shot/Brain.pth")
    return model


@pytest.fixture(scope="module")
def brain_model(reference_assets):
    """reference_model on the CPU, once per test module."""
    return reference_model(reference_assets)


@pytest.fixture(scope="session")
def inputs_for(tmp_path_factory):
    """inputs_for(seed, n_per_split): the reference inputs of tests/reference_inputs.py for that seed and size
    (~15 s, ~1.4 GB each), made once per session; seed 0 with 6 images per split is `reference_assets`."""
    from reference_inputs import make_reference_inputs

    made = {}

    def inputs(seed: int, n_per_split: int) -> Path:
        if (seed, n_per_split) == (0, 6):
            raise ValueError("the seed-0 inputs are the reference_assets fixture")
        if (seed, n_per_split) not in made:
            folder = tmp_path_factory.mktemp(f"inputs_seed{seed}_{n_per_split}")
            made[seed, n_per_split] = make_reference_inputs(folder, seed=seed, n_per_split=n_per_split)
        return made[seed, n_per_split]

    return inputs


def lay_out_checkout(assets: Path, root: Path) -> Path:
    """This repository's code in `root`, with the inputs in `assets` linked where a user puts the downloads
    (CLIP/ckpt/, ckpt/, data/, dataset/fewshot_seed/)."""
    import shutil

    for src in [REPO / "CLIP", REPO / "dataset", REPO / "mvfa", REPO / "tools", *REPO.glob("*.py")]:
        if src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "ckpt", "fewshot_seed")
            shutil.copytree(src, root / src.name, ignore=ignore)
        else:
            shutil.copy(src, root / src.name)
    (root / "CLIP/ckpt").mkdir()
    os.symlink(assets / "CLIP/ckpt/ViT-L-14-336px.pt", root / "CLIP/ckpt/ViT-L-14-336px.pt")
    for rel in ("ckpt", "data", "dataset/fewshot_seed"):
        os.symlink(assets / rel, root / rel)
    return root


@pytest.fixture(scope="session")
def checkout_for(reference_assets, inputs_for, tmp_path_factory):
    """checkout_for(seed, n_per_split): a user's checkout (lay_out_checkout) of those inputs, one per
    session; the recorded commands run in it unchanged."""
    made = {}

    def checkout(seed: int, n_per_split: int) -> Path:
        if (seed, n_per_split) not in made:
            assets = reference_assets if (seed, n_per_split) == (0, 6) else inputs_for(seed, n_per_split)
            made[seed, n_per_split] = lay_out_checkout(assets, tmp_path_factory.mktemp("checkout"))
        return made[seed, n_per_split]

    return checkout


@pytest.fixture(scope="session")
def reference_assets(tmp_path_factory) -> Path:
    """The seed-0 reference inputs (weights, adapters, data, support lists), regenerated once per session by
    tests/reference_inputs.py (~15 s, ~1.4 GB).

    MVFA_ASSETS=DIR reuses a folder made earlier (`python tests/reference_inputs.py DIR`).
    """
    from reference_inputs import make_reference_inputs

    cached = os.environ.get("MVFA_ASSETS")
    if cached and (Path(cached) / "CLIP/ckpt/ViT-L-14-336px.pt").is_file():
        return Path(cached)
    return make_reference_inputs(tmp_path_factory.mktemp("reference_assets"), seed=0, n_per_split=6)


def assert_matches_probe(tensor, probe: dict, atol: float = 0.0, msg: str = "") -> None:
    """`tensor` against a probe of a reference tensor ({'shape', 'dtype', 'index', 'values', 'sum', 'norm'}):
    the same shape and dtype; at the probe's flat positions the same values (atol 0: torch.equal, else
    within atol); its float64 sum and norm those of the probe, to float64 rounding (relative 1e-12) when
    atol is 0, else within what values within atol allow (below)."""
    import torch

    where = f" ({msg})" if msg else ""
    assert tuple(tensor.shape) == tuple(probe["shape"]), f"shape {tuple(tensor.shape)}{where}"
    assert tensor.dtype == probe["dtype"], f"dtype {tensor.dtype}{where}"
    flat = tensor.detach().cpu().reshape(-1)
    got = flat[probe["index"]]
    if atol == 0:
        assert torch.equal(got, probe["values"]), f"values at the probe positions differ{where}"
    else:
        torch.testing.assert_close(got, probe["values"], atol=atol, rtol=0, msg=f"probe values{where}")
    wide = flat.double()
    # values within atol one by one: the norms then differ by at most sqrt(n) * atol (triangle inequality);
    # the sums by n * atol at worst, which checks nothing on large tensors, but independent last-bit
    # differences add up like a random walk, whose standard deviation is at most sqrt(n) * atol: 6 of those
    for name, value, bound in (
        ("sum", wide.sum().item(), 6 * math.sqrt(flat.numel()) * atol),
        ("norm", wide.norm().item(), math.sqrt(flat.numel()) * atol),
    ):
        expected = probe[name]
        assert value == expected or abs(value - expected) <= bound + SUM_NORM_RTOL * abs(expected), (
            f"{name} {value!r}, reference {expected!r}{where}"
        )


@pytest.fixture(scope="session")
def golden_image(reference_assets, goldens):
    """The goldens' test image ([1, 3, 240, 240], as the reference loads it) from its file, checked against
    the goldens' probe of it."""
    from dataset import load_image

    image = load_image(str(reference_assets / "data" / goldens["image_file"]), 240)[None]
    assert_matches_probe(image, goldens["image"], msg="image")
    return image


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Runs keep their text-feature cache in this session's temporary folder (subprocesses inherit it),
    never in the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


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


# Skips that CI accepts (MVFA_STRICT_SKIPS=1, set by .ci/run): (test file, start of the reason). Any other
# skip fails the run, so a test that silently stops running is seen.
ALLOWED_SKIPS = [
    ("tests/test_cuda.py", "no CUDA device here"),  # no GPU on CI's machines
    ("tests/test_prefix_cache.py", "no CUDA device here"),
    ("tests/test_faults.py", "root writes into read-only folders"),  # CI runs as root
    ("tests/test_reference_runs.py", "another kernel family"),  # the exact whole-run replays only
]
unexpected_skips = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        path, _, reason = report.longrepr if isinstance(report.longrepr, tuple) else ("", 0, str(report))
        reason = reason.removeprefix("Skipped: ")
        test_file = report.nodeid.split("::")[0]
        allowed = any(test_file == f and reason.startswith(start) for f, start in ALLOWED_SKIPS)
        # another kernel family excuses only a whole-run replay's exact comparison, never a cross-CPU check
        if allowed and test_file == "tests/test_reference_runs.py":
            allowed = "exact" in report.nodeid
        if not allowed:
            unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if unexpected_skips and os.environ.get("MVFA_STRICT_SKIPS") == "1":
        listing = "\n  ".join(unexpected_skips)
        print(f"\nunexpected skips (MVFA_STRICT_SKIPS=1; allowed: conftest.py ALLOWED_SKIPS):\n  {listing}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
