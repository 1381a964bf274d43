"""Zero-shot training: adapters trained on the other five datasets' test splits, leave-one-out (spec 7.1, 7.4).

    python train_zero.py --obj Retina_RESC
    python train_zero.py --obj Brain --select val --save_path ./ckpt/mine-zero/
"""
import argparse

from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import CLASS_NAMES, DATASETS, check_obj
from dataset.medical_zero import MedTestDataset, MedTrainDataset
from evaluate import result_lines, selection_score
from prompt import text_features_for
from test_zero import load_test_data, evaluate_zeroshot
from train_few import adapter_copy, add_training_args, train_step, training_model
from utils import add_common_args, add_sort_listing_arg, checkpoint_path, clip_file, resolve_device, run_main, \
    save_checkpoint, setup_seed, versions, write_record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, obj="Retina_RESC")
    add_training_args(p, lr=0.0001, save_path="./ckpt/zero-shot/")
    add_sort_listing_arg(p, "the training images are shuffled into groups")
    return p


def run(args) -> dict:
    device = resolve_device(args.device)
    setup_seed(args.seed, args.deterministic)
    check_obj(args.obj)
    train_set = MedTrainDataset(args.data_path, args.obj, args.img_size, args.batch_size,
                                sort_listing=args.sort_listing, normalize=args.clip_normalize)
    if len(train_set) == 0:
        raise ValueError(f"no zero-shot training images: the test splits of the other datasets under "
                         f"{args.data_path} are empty (training uses the five datasets other than --obj {args.obj})")
    test_set = load_test_data(args)
    # deviation (--select val): the target's valid split, never its test split
    selection = test_set if args.select != "val" else MedTestDataset(args.data_path, args.obj, args.img_size,
                                                                     args.clip_normalize, "valid")
    target = checkpoint_path(args.save_path, args.obj)
    model, seg_opt, det_opt = training_model(args, device, target)
    texts = text_features_for(model.clipmodel, CLASS_NAMES, device, args.precision)
    extras = {"args": vars(args), "versions": versions(device)}
    every = max(1, len(train_set) // 5)  # deviation: the reference divides by zero below 5 groups (spec Q24)
    best, best_result, best_state = 0.0, {}, None
    for epoch in range(args.epoch):
        losses = []
        loader = DataLoader(train_set, batch_size=1, shuffle=True, num_workers=args.num_workers)
        for idx, (images, labels, masks, name) in enumerate(tqdm(loader, desc=f"epoch {epoch}")):
            if args.select != "last" and idx % every == 0:  # evaluated before the step, as the reference
                result = evaluate_zeroshot(args, model, selection, texts[args.obj], device, pixel_extras=False)
                print("\n".join(("[valid] " if args.select == "val" else "") + line
                                for line in result_lines(args.obj, result, fewshot=False)))
                if selection_score(result) >= best:  # non-strict, as the reference
                    best, best_result, best_state = selection_score(result), result, adapter_copy(model)
                    print(f"best epoch found: epoch {epoch} batch {idx}")
                    if args.save_model:
                        save_checkpoint(model, target, {**extras, "epoch": epoch, "batch": idx,
                                                        "selection": args.select})
            name = name[0]  # each loader item is one pre-grouped batch: [1, B, ...]
            losses.append(train_step(model, images[0], labels[0], masks[0], texts[name], DATASETS[name][1], seg_opt,
                                     det_opt, device, args.precision, args.img_size, args.bce_on_probability))
        print(f"epoch {epoch} loss {sum(losses) / len(losses):.4f}")
        train_set.shuffle_dataset()
    if args.select == "last" and args.save_model:
        save_checkpoint(model, target, {**extras, "epoch": args.epoch - 1, "selection": "last"})
    result = best_result
    if args.select != "test":
        if best_state is not None:
            model.load_state_dict(best_state, strict=False)
        result = evaluate_zeroshot(args, model, test_set, texts[args.obj], device)
        print("test set:\n" + "\n".join(result_lines(args.obj, result, fewshot=False)))
    write_record(args.out_dir, "train_zero", args, result, {"clip": clip_file(args),
                                                            "adapters": target if args.save_model else None},
                 device)
    return result


def main(argv=None) -> int:
    return run_main(run, parser(), argv)


if __name__ == "__main__":
    main()
