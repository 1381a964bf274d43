"""Adapter training shared by train_few.py and train_zero.py: optimisers, one step, the epoch loop with checkpoint
selection, and the final test of the chosen weights (spec 5.4, 6.4, 7.4, Q4, Q11)."""
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from CLIP import build_model
from evaluate import result_lines, selection_score
from loss import detection_loss, segmentation_loss
from records import check_writable, clip_file, save_checkpoint, versions, write_record
from utils import autocast, scoring_autocast, scoring_inputs


def optimizers(model, lr: float) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    return (torch.optim.Adam(model.seg_adapters.parameters(), lr=lr, betas=(0.5, 0.999)),
            torch.optim.Adam(model.det_adapters.parameters(), lr=lr, betas=(0.5, 0.999)))


def training_model(args, device: torch.device, target: Path) -> tuple:
    """An existing checkpoint at `target` is refused first; then the model (adapters from --init_ckpt if given)
    and its seg and det optimisers."""
    if args.save_model:
        check_writable(target, args.overwrite)
    model = build_model(args, device)
    if args.init_ckpt:
        model.load_adapters(args.init_ckpt)
    return (model, *optimizers(model, args.learning_rate))


def train_step(model, images, labels, masks, text: torch.Tensor, *, has_masks: bool, seg_opt, det_opt,
               device: torch.device, precision: str, img_size: int, bce_on_probability: bool = False) -> float:
    """One update (spec 5.4, Q11): det loss always; seg loss on datasets with masks, and only then the seg step."""
    with autocast(device, precision):
        _, seg, det = model(images.to(device))
        with scoring_autocast(device, precision):  # the losses in fp32 under bf16
            seg, det = scoring_inputs(seg, precision), scoring_inputs(det, precision)
            text = scoring_inputs([text], precision)[0]
            loss = detection_loss(det, text, labels.to(device).float(), bce_on_probability)
            if has_masks:
                masks = (masks.to(device) > 0.5).float()
                loss = segmentation_loss(seg, text, masks, img_size) + loss
    seg_opt.zero_grad(set_to_none=True)
    det_opt.zero_grad(set_to_none=True)
    loss.backward()
    det_opt.step()
    if has_masks:  # the seg adapters get gradients from image-only samples too, never applied (as the reference)
        seg_opt.step()
    return loss.item()


def adapter_copy(model) -> dict:
    adapters = ("seg_adapters", "det_adapters")
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(adapters)}


class Selection:
    """Checkpoint selection during training: evaluate, print the reference's lines, keep and save the best weights.

    Few-shot keeps a score only above the best so far (strict, as the reference), zero-shot also when equal.
    """

    def __init__(self, args, model, target: Path, device: torch.device, evaluate: Callable[[], dict],
                 fewshot: bool):
        self.args, self.model, self.target, self.evaluate, self.fewshot = args, model, target, evaluate, fewshot
        self.extras = {"args": vars(args), "versions": versions(device)}
        self.best, self.result, self.state = 0.0, {}, None

    def __call__(self, epoch: int, batch: int | None = None) -> None:
        result = self.evaluate()
        prefix = "[valid] " if self.args.select == "val" else ""
        print("\n".join(prefix + line for line in result_lines(self.args.obj, result, self.fewshot)))
        score = selection_score(result)
        if score > self.best or (not self.fewshot and score == self.best):
            self.best, self.result, self.state = score, result, adapter_copy(self.model)
            where = {"epoch": epoch} if batch is None else {"epoch": epoch, "batch": batch}
            if batch is not None:
                print(f"best epoch found: epoch {epoch} batch {batch}")
            if self.args.save_model:
                save_checkpoint(self.model, self.target, {**self.extras, **where, "selection": self.args.select})

    def finish(self, script: str, test: Callable[[], dict], device: torch.device) -> dict:
        """--select last saves the final weights; val and last report the chosen weights on the test set, which
        selection never saw; then the run record."""
        args = self.args
        if args.select == "last" and args.save_model:
            save_checkpoint(self.model, self.target, {**self.extras, "epoch": args.epoch - 1, "selection": "last"})
        result = self.result
        if args.select != "test":
            if self.state is not None:
                self.model.load_state_dict(self.state, strict=False)
            result = test()
            print("test set:\n" + "\n".join(result_lines(args.obj, result, self.fewshot)))
        saved = args.save_model and (self.state is not None or args.select == "last")
        if args.save_model and not saved:  # the score never rose above 0 (an AUROC of 0): the reference saves nothing
            print(f"no checkpoint saved: the selection score never rose above 0; {self.target} was not written")
        write_record(args.out_dir, script, args, result, {"clip": clip_file(args),
                                                          "adapters": self.target if saved else None}, device)
        return result


def train_epochs(args, batches: Callable[[int], Iterable], step: Callable[..., float], selection: Selection,
                 every: int | None = None) -> None:
    """args.epoch epochs of `step(*batch)` over `batches(epoch)`; selection after each epoch (every=None, few-shot)
    or before steps 0, every, 2 every, ... of each epoch (zero-shot, spec 7.4)."""
    for epoch in range(args.epoch):
        losses = []
        for idx, batch in enumerate(tqdm(batches(epoch), desc=f"epoch {epoch}")):
            if every and args.select != "last" and idx % every == 0:  # evaluated before the step, as the reference
                selection(epoch, idx)
            losses.append(step(*batch))
        print(f"epoch {epoch} loss {np.mean(losses):.4f}")
        if not every and args.select != "last":
            selection(epoch)
