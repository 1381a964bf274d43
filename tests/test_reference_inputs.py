"""The repository's own generator rebuilds the seed-0 reference inputs byte for byte, from the repository
alone.

tests/fixtures/reference/inputs_seed0.sha256 lists the sha256 of every file that the reference scripts
(`make_ckpts.py DIR 0`, `make_synth_bmad.py DIR 6 0`) write;
the fixtures beside it were recorded on those files.
"""

import shutil
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from reference_inputs import file_digests, make_reference_inputs  # noqa: E402

RECORDED = TESTS / "fixtures" / "reference" / "inputs_seed0.sha256"


def recorded_digests() -> dict[str, str]:
    """{relative path: sha256} from the recorded list (sha256sum format)."""
    digests = {}
    for line in RECORDED.read_text().splitlines():
        digest, path = line.split("  ", 1)
        digests[path] = digest
    return digests


def test_generator_reproduces_recorded_inputs(tmp_path):
    """~15 s and ~1.4 GB of disk, freed before the test returns."""
    expected = recorded_digests()
    root = tmp_path / "assets"
    try:
        make_reference_inputs(root, seed=0, n_per_split=6)
        got = file_digests(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert sorted(set(expected) - set(got)) == [], "files missing"
    assert sorted(set(got) - set(expected)) == [], "unexpected files"
    differing = sorted(p for p in expected if got[p] != expected[p])
    assert differing == [], f"{len(differing)} of {len(expected)} files differ from the recorded sha256"


def test_recorded_list_is_sorted_and_complete():
    """The fixture itself: one sorted line per file, in the layout the reference README describes."""
    lines = RECORDED.read_text().splitlines()
    paths = [line.split("  ", 1)[1] for line in lines]
    assert paths == sorted(paths) and len(set(paths)) == len(paths) == 217
    assert "CLIP/ckpt/ViT-L-14-336px.pt" in paths
    assert sum(p.startswith("ckpt/") for p in paths) == 12  # {few,zero}-shot x six datasets
    assert sum(p.startswith("dataset/fewshot_seed/") for p in paths) == 24  # six datasets x four shots
