"""Adapter training shared by train_few.py and train_zero.py: optimisers, one step, and `Training`: the epoch
loop with checkpoint selection, the state --resume continues from, and the final test."""

import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from CLIP.loading import read_state_dict
from loss import detection_loss, segmentation_loss

from .config import ModelConfig, RunConfig, configs
from .evaluation import Collected, evaluate, result_lines, selection_score
from .precision import Precision
from .protocol import Batch, TrainingSet
from .records import (
    adapters_sha256,
    check_folder,
    check_readable,
    check_writable,
    save_atomic,
    save_checkpoint,
    versions,
    write_record,
)
from .seeding import rng_states, set_rng_states, setup_seed

STATE_VERSION = 2  # 2: the state records the arguments of its run
# The flags that cannot change what a run trains or saves, which --resume may therefore give other values;
# every other flag, a new one too, must be as the state's run had it (paths as written). --save_path names
# the folder the state was found in; the device counts by its type (cpu, cuda): a requeued job may get
# another GPU.
RESULT_NEUTRAL = frozenset(
    {
        "out_dir",
        "num_workers",
        "overwrite",
        "resume",
        "save_path",
        "device",
        "cache_dir",
        "no_text_cache",
        "no_prefix_cache",
        "prefix_cache_ram",
    }
)


def optimizers(model, lr: float) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """The seg and det adapters' Adam optimisers, with the reference's betas."""
    seg = torch.optim.Adam(model.seg_adapters.parameters(), lr=lr, betas=(0.5, 0.999))
    det = torch.optim.Adam(model.det_adapters.parameters(), lr=lr, betas=(0.5, 0.999))
    return seg, det


def state_file(target: Path) -> Path:
    """Where the training state of the run saving `target` is kept: beside it, never in its place."""
    return target.with_name(target.name + ".state")


def run_identity(flags: dict, device: torch.device) -> dict:
    """The flags that define a run's result, as its training state records them."""
    return {**{k: v for k, v in flags.items() if k not in RESULT_NEUTRAL}, "device": device.type}


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


def state_flaw(path: Path) -> str | None:
    """What makes `path` no file torch.save wrote, told by its size and zip structure alone (unpickling random
    bytes may ask for any amount of memory); None if it could be one."""
    if path.stat().st_size == 0:
        return "it is empty"
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    return (
        "it is cut off: a zip archive without its end"
        if zipped
        else "it is no zip archive as torch.save writes"
    )


def read_state(target: Path, identity: dict) -> dict:
    """The training state beside `target`, checked to be this code's, of its state version, and of the run
    that `identity` describes; anything else is a ValueError naming the file, what is wrong, the ways out."""
    path = state_file(target)
    afresh = "or run without --resume, which moves it aside and starts afresh"
    try:
        flaw = state_flaw(path)
        saved = None if flaw else torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - damage inside the archive: the loader's first sentence says what
        flaw = f"{type(e).__name__}: {(str(e).split('. ')[0].splitlines() or [''])[0][:200]}"
    if flaw:
        raise ValueError(
            f"training state {path} cannot be read ({flaw}): delete it or move it away, {afresh}"
        )
    if not isinstance(saved, dict) or "mvfa_training_state" not in saved:
        raise ValueError(f"{path} is not a training state of this code: move it away, {afresh}")
    if saved["mvfa_training_state"] != STATE_VERSION:
        raise ValueError(
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
        raise ValueError(
            f"training state {path} is of a run with other arguments: {differences}; to "
            f"continue that run, rerun its command ({original} --resume), or run without "
            f"--resume, which moves the state aside{overwrite} and starts afresh"
        )
    return saved


def preflight(run: RunConfig, model: ModelConfig, flags: dict, device: torch.device) -> dict | None:
    """What a training run can check before it reads data or builds the model, so that a mistake surfaces in
    seconds: the folders it writes, the checkpoint it would replace, the weights files it reads and, with
    --resume, the state it continues (returned; None: the run starts from the beginning)."""
    target = run.checkpoint
    check_folder(target.parent, "--save_path")  # the state is written there even with --save_model 0
    check_folder(Path(run.out_dir), "--out_dir")  # the run record, written at the very end
    state, saved = state_file(target), None
    if run.resume and state.exists():
        saved = read_state(target, run_identity(flags, device))
    elif run.resume:
        print(f"--resume: no training state at {state} yet: starting from the beginning", file=sys.stderr)
    if run.save_model and saved is None:
        if state.exists() and target.exists() and not run.overwrite:
            raise FileExistsError(
                f"{target} exists already, beside the training state {state} of an unfinished run: "
                f"add --resume to continue that run, "
                f"or --overwrite to start afresh (the state is then moved aside)"
            )
        check_writable(target, run.overwrite)
    clip = model.clip_file
    if clip is not None:
        if not clip.is_file():
            read_state_dict(clip, model.model_name)  # raises the FileNotFoundError saying where to get it
        check_readable(clip, "CLIP weights")
    if run.init_ckpt:
        if not Path(run.init_ckpt).is_file():
            raise FileNotFoundError(f"--init_ckpt {run.init_ckpt}: no such file")
        check_readable(Path(run.init_ckpt), "adapter checkpoint")
    return saved


def start(flags: dict, protocol: str) -> tuple[ModelConfig, RunConfig, Precision, torch.device, dict | None]:
    """What every training does before it reads data: its configs, the checks of preflight() (with --resume,
    the state it continues: last of the returned values), and the reference's seeding."""
    model, run, precision, device = configs(flags, protocol)
    saved = preflight(run, model, flags, device)
    setup_seed(run.seed, run.deterministic)
    return model, run, precision, device, saved


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


def train_step(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    text: torch.Tensor,
    *,
    has_masks: bool,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    precision: Precision,
    img_size: int,
    bce_on_probability: bool = False,
) -> float:
    """One update: the det loss always; the seg loss on datasets with masks, and only then the seg step (the
    seg adapters also get gradients from image-only samples, never applied, as in the reference)."""
    device = next(model.parameters()).device
    seg_opt, det_opt = optimizers
    with precision.forward():
        _, seg, det = model(images.to(device))
        with precision.scoring():  # the losses in fp32 under bf16
            seg, det = precision.scored(seg), precision.scored(det)
            text = precision.scored([text])[0]
            loss = detection_loss(det, text, labels.to(device).float(), bce_on_probability)
            if has_masks:
                masks = (masks.to(device) > 0.5).float()
                loss = segmentation_loss(seg, text, masks, img_size) + loss
    seg_opt.zero_grad(set_to_none=True)
    det_opt.zero_grad(set_to_none=True)
    loss.backward()
    det_opt.step()
    if has_masks:
        seg_opt.step()
    return loss.item()


def adapter_copy(model) -> dict:
    adapters = ("seg_adapters", "det_adapters")
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(adapters)}


class Training:
    """One training run: its optimisers, the epoch loop with checkpoint selection, the state --resume
    continues from (written atomically beside the checkpoint after every epoch and on SIGTERM, SIGUSR1 or
    SIGUSR2, SLURM's preemption and time-limit signals), and the final test of the chosen weights."""

    def __init__(
        self,
        model,
        run: RunConfig,
        flags: dict,
        precision: Precision,
        clip_file: Path | None,
        saved: dict | None,
    ):
        """`model`: the adapted CLIP with fresh adapters (replaced by --init_ckpt's); `flags`: the command
        line's values, which the state and the run record keep; `saved`: the state preflight() read for
        --resume, which fit() continues. Without --resume a state left beside the checkpoint is moved
        aside."""
        self.model, self.run, self.flags, self.precision = model, run, flags, precision
        self.target, self.clip_file, self.saved = run.checkpoint, clip_file, saved
        self.device = next(model.parameters()).device
        if not run.resume:
            move_aside(state_file(self.target))
        if run.init_ckpt:
            model.load_adapters(run.init_ckpt)
        self.optimizers = optimizers(model, run.learning_rate)
        self.extras = {"args": flags, "versions": versions(self.device)}
        self.best, self.result, self.best_adapters = 0.0, {}, None
        # --select test: what the chosen weights' pass over the test set collected, so that the final report
        # adds its extra metrics without a second pass
        self.best_collected: Collected | None = None
        self.lines, self.signalled = [], None
        # each epoch's mean training loss at full precision, and every step's loss (the run record keeps both)
        self.epoch_losses, self.step_losses = [], []

    def step(self, batch: Batch, texts: dict[str, torch.Tensor]) -> float:
        return train_step(
            self.model,
            batch.images,
            batch.labels,
            batch.masks,
            texts[batch.text],
            has_masks=batch.has_masks,
            optimizers=self.optimizers,
            precision=self.precision,
            img_size=self.run.img_size,
            bce_on_probability=self.run.bce_on_probability,
        )

    def say(self, text: str) -> None:
        print(text)
        self.lines.extend(text.splitlines())

    def select(
        self, evaluate: Callable[[], tuple[dict, Collected]], epoch: int, batch: int | None = None
    ) -> None:
        result, collected = evaluate()
        prefix = "[valid] " if self.run.select == "val" else ""
        fewshot = self.run.fewshot
        self.say("\n".join(prefix + line for line in result_lines(self.run.obj, result, fewshot)))
        # few-shot keeps a higher one (as the reference), zero-shot an equal too
        score = selection_score(result)
        if score > self.best or (not fewshot and score == self.best):
            self.best, self.result, self.best_adapters = score, result, adapter_copy(self.model)
            self.best_collected = collected if self.run.select == "test" else None
            where = {"epoch": epoch} if batch is None else {"epoch": epoch, "batch": batch}
            if batch is not None:
                self.say(f"best epoch found: epoch {epoch} batch {batch}")
            if self.run.save_model:
                save_checkpoint(
                    self.model, self.target, {**self.extras, **where, "selection": self.run.select}
                )

    def fit(
        self,
        data: TrainingSet,
        texts: dict[str, torch.Tensor],
        evaluate: Callable[[], tuple[dict, Collected]],
    ) -> None:
        """--epoch epochs over `data`, each batch a step against its text features in `texts`; selection by
        `evaluate()` (metrics without the pixel extras, and what they were computed from) after each epoch, or
        every `data.every` steps."""
        saved = self.load_state() if self.run.resume else None
        every = data.every
        start, position = (saved["epoch"], saved["position"]) if saved else (0, 0)
        previous = self.catch_signals()
        try:
            for epoch in range(start, self.run.epoch):
                inside = saved is not None and epoch == start and position > 0
                if inside:  # the epoch's shuffles again from its start, then the generators as they were left
                    set_rng_states(saved["epoch_rng"])
                epoch_rng, losses = rng_states(), list(saved["losses"]) if inside else []
                for idx, batch in enumerate(tqdm(data.epoch(epoch), desc=f"epoch {epoch}")):
                    if inside and idx < position:
                        if idx == position - 1:
                            set_rng_states(saved["rng"])
                        continue
                    # before the step, as the reference
                    if every and self.run.select != "last" and idx % every == 0:
                        self.select(evaluate, epoch, idx)
                    losses.append(self.step(batch, texts))
                    if self.signalled:
                        self.stop(epoch, idx + 1, losses, epoch_rng)
                self.epoch_losses.append(float(np.mean(losses)))
                self.step_losses.append(losses)
                self.say(f"epoch {epoch} loss {self.epoch_losses[-1]:.4f}")
                if not every and self.run.select != "last":
                    self.select(evaluate, epoch)
                self.save_state(epoch + 1, 0, [], None)
                if self.signalled:
                    self.stop(epoch + 1, 0, [], None)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def catch_signals(self) -> dict:
        """SIGTERM / SIGUSR1 / SIGUSR2 (SLURM's and submitit's) ask the run to stop after the current step;
        returns the handlers they replace."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(number, frame):
            self.signalled = number

        return {n: signal.signal(n, handler) for n in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}

    def stop(self, epoch: int, position: int, losses: list, epoch_rng: dict | None) -> None:
        self.save_state(epoch, position, losses, epoch_rng)
        raise SystemExit(
            f"interrupted by signal {self.signalled}: training state saved to {state_file(self.target)}; "
            f"run the same command with --resume to continue"
        )

    def save_state(self, epoch: int, position: int, losses: list, epoch_rng: dict | None) -> None:
        """Everything the run needs to go on from step `position` of `epoch`, written atomically."""
        path = state_file(self.target)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "mvfa_training_state": STATE_VERSION,
            "args": run_identity(self.flags, self.device),
            "epoch": epoch,
            "position": position,
            "losses": losses,
            "rng": rng_states(),
            "epoch_rng": epoch_rng,
            "adapters": adapter_copy(self.model),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "best": self.best,
            "result": self.result,
            "best_adapters": self.best_adapters,
            "lines": self.lines,
            "epoch_losses": self.epoch_losses,
            "step_losses": self.step_losses,
        }
        save_atomic(state, path)

    def load_state(self) -> dict | None:
        """The state preflight() read, put back into this run (its lines printed again); None if none."""
        saved = self.saved
        if saved is None:
            return None
        path = state_file(self.target)
        self.model.load_state_dict(saved["adapters"], strict=False)
        for optimizer, state in zip(self.optimizers, saved["optimizers"]):
            optimizer.load_state_dict(state)
        self.best, self.result, self.best_adapters = saved["best"], saved["result"], saved["best_adapters"]
        self.epoch_losses = list(saved["epoch_losses"])
        self.step_losses = [list(losses) for losses in saved.get("step_losses", [])]
        set_rng_states(saved["rng"])
        print(
            f"--resume: continuing from {path} at epoch {saved['epoch']}, step {saved['position']}",
            file=sys.stderr,
        )
        for line in saved["lines"]:
            self.say(line)
        return saved

    def finish(self, script: str, test: Callable[[], tuple[dict, Collected]]) -> dict:
        """--select last saves the final weights; val and last report the chosen weights on the test set,
        which selection never saw; --select test reports the chosen pass itself, its extra metrics (AP,
        F1-max, AUPRO) computed from what it collected. Then the run record; the training state is removed."""
        run = self.run
        final_adapters = adapters_sha256(self.model.adapter_state())  # before the chosen ones are loaded
        if run.select == "last" and run.save_model:
            save_checkpoint(
                self.model, self.target, {**self.extras, "epoch": run.epoch - 1, "selection": "last"}
            )
        result = self.result
        if run.select != "test":
            if self.best_adapters is not None:
                self.model.load_state_dict(self.best_adapters, strict=False)
            result = test()[0]
            self.say("test set:\n" + "\n".join(result_lines(run.obj, result, run.fewshot)))
        elif self.best_collected is not None:
            result = evaluate(self.best_collected, self.device, self.precision)
        elif self.best_adapters is not None and self.saved is not None:
            # resumed after the choice, whose collected material the state does not keep: its pass again
            self.model.load_state_dict(self.best_adapters, strict=False)
            result = test()[0]
        saved = run.save_model and (self.best_adapters is not None or run.select == "last")
        # the score never rose above 0 (an AUROC of 0): the reference saves nothing
        if run.save_model and not saved:
            self.say(
                f"no checkpoint saved: the selection score never rose above 0; {self.target} was not written"
            )
        files = {"clip": self.clip_file, "adapters": self.target if saved else None}
        training = {
            "epoch_losses": self.epoch_losses,
            "step_losses": self.step_losses,
            "final_adapters_sha256": final_adapters,
        }
        write_record(run.out_dir, script, run.name, self.flags, result, files, self.device, training)
        state_file(self.target).unlink(missing_ok=True)
        return result
