"""The reference's recordings kept in tests/fixtures/reference/, as the tests read them.

- recordings.json: trainings and test runs recorded by the instrumented reference on one machine, with its
  kernel fingerprint (tests/kernel_fingerprint.py); see that folder's README.
- reference_outputs_seed0.txt with reference_scores_seed0/: the four seed-0 test runs recorded earlier.
"""

import json

import numpy as np
from conftest import REFERENCE

RECORDINGS = json.loads((REFERENCE / "recordings.json").read_text())
LEGACY = RECORDINGS["legacy_test_runs"]  # the machine family and threads of reference_outputs_seed0.txt


def recorded_runs(transcript: str = "reference_outputs_seed0.txt") -> list[tuple[str, list[str]]]:
    """[(command, printed lines)] of a transcript."""
    runs = []
    for line in (REFERENCE / transcript).read_text().splitlines():
        if line.startswith("$ python "):
            runs.append((line[len("$ python ") :], []))
        elif line.strip():
            runs[-1][1].append(line.strip())
    return runs


def reference_scores(command: str) -> dict:
    """What the reference passed to its AUROCs in a run of reference_outputs_seed0.txt, as
    {'image': (labels, scores), 'pixel': (masks, maps)} (flat, float64; 'pixel' where there are masks)."""
    words = command.split()
    name = f"{words[0].removesuffix('.py')}_{words[words.index('--obj') + 1]}"
    if "--shot" in words:
        name += f"_{words[words.index('--shot') + 1]}"
    recorded = np.load(REFERENCE / "reference_scores_seed0" / f"{name}.npz")
    pairs = [(recorded[f"y{i}"], recorded[f"s{i}"]) for i in range(2) if f"y{i}" in recorded]
    n_images = min(len(y) for y, _ in pairs)  # the image pair is the short one, the pixel pair N*H*W long
    return {("image" if len(y) == n_images else "pixel"): (y, s) for y, s in pairs}


def legacy_test_runs() -> list[dict]:
    """The runs of reference_outputs_seed0.txt in the form of recordings.json's test runs, with their full
    arrays: 'labels', 'image_scores' (float32) and, with masks, 'masks' and 'maps' as [N, H*W]."""
    runs = []
    for command, printed in recorded_runs():
        scores = reference_scores(command)
        labels, image_scores = scores["image"]
        run = {
            "command": command,
            "printed": printed,
            "inputs": {"seed": 0, "n_per_split": 6},
            "threads": LEGACY["threads"],
            "fingerprint": LEGACY["fingerprint"],
            "labels": labels,
            "image_scores": image_scores.astype(np.float32),
        }
        if "pixel" in scores:
            masks, maps = scores["pixel"]
            n_images = len(labels)
            run.update(masks=masks.reshape(n_images, -1), maps=maps.astype(np.float32).reshape(n_images, -1))
        runs.append(run)
    return runs
