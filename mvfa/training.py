"""Adapter training shared by train_few.py and train_zero.py: optimisers, one step, and `Training`: the epoch
loop with checkpoint selection, the state --resume continues from (mvfa/resume.py), and the final test."""

import sys
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from loss import detection_loss, segmentation_loss
from utils import InputError

from .config import ModelConfig, RunConfig
from .evaluation import Collected, evaluate, result_lines, selection_score
from .precision import Precision
from .protocol import Batch, TrainingSet
from .records import adapters_sha256, save_checkpoint, versions, write_record
from .resume import StopSignals, move_aside, read_state, run_identity, state_file, write_state
from .seeding import rng_states, set_rng_states


def optimizers(model, lr: float) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """The seg and det adapters' Adam optimisers, with the reference's betas."""
    seg = torch.optim.Adam(model.seg_adapters.parameters(), lr=lr, betas=(0.5, 0.999))
    det = torch.optim.Adam(model.det_adapters.parameters(), lr=lr, betas=(0.5, 0.999))
    return seg, det


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

    def __init__(self, model, model_config: ModelConfig, run: RunConfig, precision: Precision):
        """`model`: the adapted CLIP that `model_config` built, with fresh adapters (replaced by
        --init_ckpt's). With --resume, the state beside the checkpoint (preflight() checked it) is read
        here and fit() continues it; without, a state left there is moved aside."""
        self.model, self.run, self.precision = model, run, precision
        self.target, self.clip_file = run.checkpoint, model_config.clip_file
        self.device = next(model.parameters()).device
        self.identity = run_identity(model_config, run, precision, self.device)
        if not run.resume:
            move_aside(state_file(self.target))
        resumed = run.resume and state_file(self.target).exists()
        self.saved = read_state(self.target, self.identity) if resumed else None
        if run.init_ckpt:
            try:
                model.load_adapters(run.init_ckpt)
            except InputError as e:  # the command line names the flag that gave the file
                e.flag = e.flag or "init_ckpt"
                raise
        self.optimizers = optimizers(model, run.learning_rate)
        self.extras = {"args": run.arguments, "versions": versions(self.device)}
        self.best, self.result, self.best_adapters = 0.0, {}, None
        # --select test: what the chosen weights' pass over the test set collected, so that the final report
        # adds its extra metrics without a second pass
        self.best_collected: Collected | None = None
        self.lines, self.signals = [], StopSignals()
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
        with self.signals:
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
                    if self.signals.received:
                        self.stop(epoch, idx + 1, losses, epoch_rng)
                self.epoch_losses.append(float(np.mean(losses)))
                self.step_losses.append(losses)
                self.say(f"epoch {epoch} loss {self.epoch_losses[-1]:.4f}")
                if not every and self.run.select != "last":
                    self.select(evaluate, epoch)
                self.save_state(epoch + 1, 0, [], None)
                if self.signals.received:
                    self.stop(epoch + 1, 0, [], None)

    def stop(self, epoch: int, position: int, losses: list, epoch_rng: dict | None) -> None:
        self.save_state(epoch, position, losses, epoch_rng)
        raise SystemExit(
            f"interrupted by signal {self.signals.received}: training state saved to "
            f"{state_file(self.target)}; run the same command with --resume to continue"
        )

    def save_state(self, epoch: int, position: int, losses: list, epoch_rng: dict | None) -> None:
        """Everything the run needs to go on from step `position` of `epoch`, written atomically."""
        state = {
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
        write_state(state_file(self.target), self.identity, state)

    def load_state(self) -> dict | None:
        """The state read for --resume, put back into this run (its lines printed again); None if none."""
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
        write_record(run.out_dir, script, run.name, run.arguments, result, files, self.device, training)
        state_file(self.target).unlink(missing_ok=True)
        return result
