"""What lets a training run stop and go on: the checks before it starts (preflight), its identity, the state
file written beside its checkpoint, reading that state back for --resume, and the signals that ask it to stop
(SIGTERM, SIGUSR1, SIGUSR2: SLURM's preemption and time-limit signals)."""

import signal
import sys
import threading
import time
from pathlib import Path

import torch

from CLIP.loading import read_state_dict
from utils import BadValue, FileInTheWay, MissingFile

from .config import ModelConfig, RunConfig, result_fields
from .precision import Precision
from .records import check_folder, check_readable, check_writable, save_atomic, zip_flaw

STATE_VERSION = 3  # 3: the state records its run's identity from the configs; 2: from the flags


def state_file(target: Path) -> Path:
    """Where the training state of the run saving `target` is kept: beside it, never in its place."""
    return target.with_name(target.name + ".state")


def run_identity(model: ModelConfig, run: RunConfig, precision: Precision, device: torch.device) -> dict:
    """What defines a run's result, by flag name, as its training state records it: every config field
    that can change a result, the precision, and the device by its type (a requeued job may get another
    GPU)."""
    return {
        **result_fields(model),
        **result_fields(run),
        "precision": precision.name,
        "device": device.type,
    }


def shown(value) -> str:
    """A flag's value as a message shows it."""
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "unset"}[value]
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def as_flag(name: str, value) -> str:
    """How a command line gives `value` to `--name`; a switch that is off, or an unset option, is left out."""
    if value is False or value is None:
        return f"without --{name}"
    return f"--{name}" if value is True else f"--{name} {shown(value)}"


def read_state(target: Path, identity: dict) -> dict:
    """The training state beside `target`, checked to be this code's, of its state version, and of the run
    that `identity` describes; anything else is a BadValue naming the file, what is wrong, the ways out."""
    path = state_file(target)
    afresh = "or run without --resume, which moves it aside and starts afresh"
    try:
        flaw = zip_flaw(path)
        saved = None if flaw else torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - damage inside the archive: the loader's first sentence says what
        flaw = f"{type(e).__name__}: {(str(e).split('. ')[0].splitlines() or [''])[0][:200]}"
    if flaw:
        raise BadValue(f"training state {path} cannot be read ({flaw}): delete it or move it away, {afresh}")
    if not isinstance(saved, dict) or "mvfa_training_state" not in saved:
        raise BadValue(f"{path} is not a training state of this code: move it away, {afresh}")
    if saved["mvfa_training_state"] != STATE_VERSION:
        raise BadValue(
            f"training state {path} is of state version {saved['mvfa_training_state']}, this "
            f"code continues version {STATE_VERSION} only: continue it with the code that wrote "
            f"it, or delete it or move it away, {afresh}"
        )
    old = saved["args"]
    changed = [k for k in {**old, **identity} if old.get(k, ...) != identity.get(k, ...)]
    if changed:
        differences = ", ".join(
            f"--{k} {shown(old.get(k, 'absent'))} -> {shown(identity.get(k, 'absent'))}" for k in changed
        )
        original = " ".join(as_flag(k, old[k]) for k in changed if k in old)
        overwrite = f" and replaces {target} with --overwrite" if target.exists() else ""
        raise BadValue(
            f"training state {path} is of a run with other arguments: {differences}; to "
            f"continue that run, rerun its command ({original} --resume), or run without "
            f"--resume, which moves the state aside{overwrite} and starts afresh"
        )
    return saved


def preflight(model: ModelConfig, run: RunConfig, precision: Precision, device: torch.device) -> None:
    """What a training run can check before it reads data or builds the model, so that a mistake surfaces in
    seconds: the folders it writes, the checkpoint it would replace, the weights files it reads and, with
    --resume, the state it continues."""
    target = run.checkpoint
    check_folder(target.parent, "save_path")  # the state is written there even with --save_model 0
    check_folder(Path(run.out_dir), "out_dir")  # the run record, written at the very end
    state, continued = state_file(target), False
    if run.resume and state.exists():
        read_state(target, run_identity(model, run, precision, device))
        continued = True
    elif run.resume:
        print(f"--resume: no training state at {state} yet: starting from the beginning", file=sys.stderr)
    if run.save_model and not continued:
        if state.exists() and target.exists() and not run.overwrite:
            raise FileInTheWay(
                f"{target} exists already, beside the training state {state} of an unfinished run: "
                f"add --resume to continue that run, "
                f"or --overwrite to start afresh (the state is then moved aside)",
                flag="save_path",
            )
        check_writable(target, run.overwrite)
    clip = model.clip_file
    if clip is not None:
        if not clip.is_file():
            read_state_dict(clip, model.model_name)  # raises the MissingFile saying where to get it
        check_readable(clip, "CLIP weights")
    if run.init_ckpt:
        if not Path(run.init_ckpt).is_file():
            raise MissingFile(f"adapter checkpoint {run.init_ckpt}: no such file", flag="init_ckpt")
        check_readable(Path(run.init_ckpt), "adapter checkpoint")


def write_state(path: Path, identity: dict, state: dict) -> None:
    """A training state, tagged with this code's state version and its run's identity, written atomically."""
    save_atomic({"mvfa_training_state": STATE_VERSION, "args": identity, **state}, path)


def move_aside(path: Path) -> None:
    """The training state of an earlier run, renamed `{path}.old-{time}` by a run that starts afresh: kept,
    never replaced by the new run's."""
    if not path.exists():
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    new, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while new.exists():
        n += 1
        new = path.with_name(f"{path.name}.old-{stamp}-{n}")
    path.rename(new)
    print(
        f"without --resume this run starts afresh: the training state {path} of an earlier run was moved "
        f"aside to {new}",
        file=sys.stderr,
    )


class StopSignals:
    """Within `with`: SIGTERM / SIGUSR1 / SIGUSR2 (SLURM's and submitit's) ask the run to stop after the
    current step; `received` is then the signal's number. The handlers they replace are put back on exit;
    outside the main thread nothing is caught."""

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            numbers = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
            self.previous = {n: signal.signal(n, self.handle) for n in numbers}
        return self

    def handle(self, number, frame) -> None:
        self.received = number

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
