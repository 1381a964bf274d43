"""Few-shot training: adapters trained on k augmented normal and k abnormal support images (spec 6.4).

    python train_few.py --obj Brain --shot 4
    python train_few.py --obj Liver --shot 8 --select val --shot_in_name --save_path ./ckpt/mine/
    python train_few.py --obj Chest --shot 4 --epoch 5 --precision bf16
"""
import argparse
import os

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from dataset import DATASETS, dataset_root
from dataset.medical_few import MedTestDataset
from evaluate import result_lines, selection_score
from loss import detection_loss, segmentation_loss
from prompt import text_features_for
from test_few import load_fewshot_data, evaluate_fewshot
from utils import (add_common_args, add_fewshot_args, augment, autocast, build_model, check_writable, checkpoint_path,
                   clip_file, positive_int, resolve_device, run_main, save_checkpoint, setup_seed, versions,
                   write_record)

SELECTIONS = ("test", "val", "last")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, obj="Liver")
    add_fewshot_args(p)
    add_training_args(p, lr=0.001, save_path="./ckpt/few-shot/")
    p.add_argument("--shot_in_name", action="store_true",
                   help="fix: save as {obj}_{shot}shot.pth so runs with other k do not replace each other")
    return p


def add_training_args(p, lr: float, save_path: str) -> None:
    p.add_argument("--epoch", type=positive_int, default=50, help="training epochs")
    p.add_argument("--learning_rate", type=float, default=lr, help="Adam learning rate (betas 0.5, 0.999)")
    p.add_argument("--save_model", type=int, default=1, choices=[0, 1], help="1: save the selected adapters")
    p.add_argument("--save_path", default=save_path, help="folder the adapter checkpoint {obj}.pth is saved in")
    p.add_argument("--overwrite", action="store_true", help="allow replacing a checkpoint that existed before the run")
    p.add_argument("--init_ckpt", default=None, help="start from these adapters (released layout) instead of random")
    p.add_argument("--select", default="test", choices=SELECTIONS,
                   help="checkpoint selection: 'test' scores on the test set as the reference; 'val' on held-out "
                        "valid images; 'last' keeps the final weights")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic torch kernels where they exist (slower on CUDA; the reference's training is "
                        "not bitwise reproducible on CUDA)")
    p.add_argument("--bce_on_probability", action="store_true",
                   help="fix: image-level loss = BCE of the mean abnormal probability (the reference passes that "
                        "probability to BCE-with-logits)")


def optimizers(model, lr: float) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    return (torch.optim.Adam(model.seg_adapters.parameters(), lr=lr, betas=(0.5, 0.999)),
            torch.optim.Adam(model.det_adapters.parameters(), lr=lr, betas=(0.5, 0.999)))


def training_model(args, device: torch.device, target) -> tuple:
    """An existing checkpoint at `target` is refused first; then the model (adapters from --init_ckpt if given)
    and its seg and det optimisers."""
    if args.save_model:
        check_writable(target, args.overwrite)
    model = build_model(args, device)
    if args.init_ckpt:
        model.load_adapters(args.init_ckpt)
    return (model, *optimizers(model, args.learning_rate))


def train_step(model, images, labels, masks, text: torch.Tensor, has_masks: bool, seg_opt, det_opt,
               device: torch.device, precision: str, img_size: int, bce_on_probability: bool = False) -> float:
    """One update (spec 5.4, Q11): det loss always; seg loss on datasets with masks, and only then the seg step."""
    with autocast(device, precision):
        _, seg, det = model(images.to(device))
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


def fewshot_training_set(support) -> TensorDataset:
    """Augmented abnormal (label 1, their masks) then augmented normal (label 0, empty masks): 22k items."""
    abnormal, abnormal_masks = augment(support.abnormal, support.abnormal_masks)
    normal, normal_masks = augment(support.normal)
    labels = torch.tensor([1.0] * len(abnormal) + [0.0] * len(normal))
    return TensorDataset(torch.cat([abnormal, normal]), torch.cat([abnormal_masks, normal_masks]), labels)


def selection_set(args, data):
    """What checkpoints are chosen on: the test set (reference), or the valid split minus the support images."""
    if args.select != "val":
        return data
    held_out = MedTestDataset(args.data_path, args.obj, args.img_size, args.clip_normalize, "valid")
    valid = os.path.join(dataset_root(args.data_path, args.obj), "valid")
    used = {os.path.join(valid, "good", "img", n) for n in data.support.normal_files} | \
           {os.path.join(valid, "Ungood", "img", n) for n in data.support.abnormal_files}
    # by path, not by name: a normal and an abnormal image may have the same file name
    held_out.items = [item for item in held_out.items if item[0] not in used]
    if len({label for _, label, _ in held_out.items}) < 2:
        raise ValueError(f"--select val: the valid split of {args.obj} has no normal or no abnormal image left "
                         f"besides the support set; use --select test or last")
    return held_out


def run(args) -> dict:
    device = resolve_device(args.device)
    setup_seed(args.seed, args.deterministic)
    data = load_fewshot_data(args, args.iterate)
    has_masks = DATASETS[args.obj][1]
    target = checkpoint_path(args.save_path, args.obj, args.shot if args.shot_in_name else None)
    model, seg_opt, det_opt = training_model(args, device, target)
    selection = selection_set(args, data)
    loader = DataLoader(fewshot_training_set(data.support), batch_size=1, shuffle=True)
    support, _ = augment(data.support.normal)  # memory-bank images [11k, 3, H, W]
    text = text_features_for(model.clipmodel, [args.obj], device, args.precision)[args.obj]
    extras = {"args": vars(args), "versions": versions(device)}
    best, best_result, best_state = 0.0, {}, None
    for epoch in range(args.epoch):
        losses = [train_step(model, images, labels, masks, text, has_masks, seg_opt, det_opt, device, args.precision,
                             args.img_size, args.bce_on_probability)
                  for images, masks, labels in tqdm(loader, desc=f"epoch {epoch}")]
        print(f"epoch {epoch} loss {sum(losses) / len(losses):.4f}")
        if args.select == "last":
            continue
        result = evaluate_fewshot(args, model, selection, support, text, device, pixel_extras=False)
        print("\n".join(("[valid] " if args.select == "val" else "") + line
                        for line in result_lines(args.obj, result, fewshot=True)))
        if selection_score(result) > best:  # strict, as the reference
            best, best_result, best_state = selection_score(result), result, adapter_copy(model)
            if args.save_model:
                save_checkpoint(model, target, {**extras, "epoch": epoch, "selection": args.select})
    if args.select == "last" and args.save_model:
        save_checkpoint(model, target, {**extras, "epoch": args.epoch - 1, "selection": "last"})
    result = best_result
    if args.select != "test":  # report the chosen weights on the test set, which selection never saw
        if best_state is not None:
            model.load_state_dict(best_state, strict=False)
        result = evaluate_fewshot(args, model, data, support, text, device)
        print("test set:\n" + "\n".join(result_lines(args.obj, result, fewshot=True)))
    saved = args.save_model and (best_state is not None or args.select == "last")
    if args.save_model and not saved:  # the score never rose above 0 (an AUROC of 0): the reference saves nothing too
        print(f"no checkpoint saved: the selection score never rose above 0; {target} was not written")
    write_record(args.out_dir, "train_few", args, result, {"clip": clip_file(args),
                                                           "adapters": target if saved else None}, device)
    return result


def main(argv=None) -> int:
    return run_main(run, parser(), argv)


if __name__ == "__main__":
    main()
