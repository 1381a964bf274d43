"""The losses of a training's first steps, without the rest of the run.

    python tests/first_steps.py N train_few.py --obj Brain --shot 2 ...    # prints the N losses as JSON

The script's own `main` runs unchanged (configs, seeding, model, adapters' random start, text features, the
shuffled data) until its N-th training step has been taken; then the run stops. The losses are those the run
record's `training.step_losses` would hold, so they compare with a reference recording's first steps on any
CPU, where a whole run cannot (tests/test_reference_runs.py).
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Enough(BaseException):
    """Ends the run after the wanted steps (not an Exception: nothing on the way may catch it)."""


def take_first_steps(steps: int, script: str, args: list[str]) -> list[float]:
    """In this process: `script`'s main(args) until `steps` training steps have been taken; their losses."""
    from mvfa.training import Training

    losses = []
    step = Training.step

    def counted(self, *inputs):
        losses.append(step(self, *inputs))
        if len(losses) == steps:
            raise Enough

    Training.step = counted
    try:
        importlib.import_module(Path(script).stem).main(args)
    except Enough:
        return losses
    finally:
        Training.step = step
    raise RuntimeError(f"{script} ended after {len(losses)} steps, before {steps}")


def first_steps(steps: int, command: list[str], env: dict, cwd: Path = REPO) -> list[float]:
    """take_first_steps in a fresh process with `env` (kernel and thread variables are read at start)."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(steps), *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode:
        raise RuntimeError(f"first steps of {' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.path.insert(1, str(REPO))
    print(json.dumps(take_first_steps(int(sys.argv[1]), sys.argv[2], sys.argv[3:])))
