"""Few-shot training: adapters trained on k augmented normal and k abnormal support images of the target.

python train_few.py --obj Brain --shot 4
python train_few.py --obj Liver --shot 8 --select val --shot_in_name --save_path ./ckpt/mine/
python train_few.py --obj Chest --shot 4 --epoch 5 --precision bf16
"""

import argparse

from dataset.augment import augment
from mvfa.config import configs
from mvfa.evaluation import Collected, evaluate_set
from mvfa.flags import add_fewshot_args, add_training_args, new_parser, one_line_errors
from mvfa.prefix_cache import prefix_cache, serving
from mvfa.protocol import fewshot_training_set, prompt, selection_set, test_set
from mvfa.resume import preflight
from mvfa.seeding import setup_seed
from mvfa.text_cache import adapted_model
from mvfa.training import Training


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__, obj="Liver")
    add_fewshot_args(p)
    add_training_args(p, lr=0.001, save_path="./ckpt/few-shot/")
    p.add_argument(
        "--shot_in_name",
        action="store_true",
        help="fix: save as {obj}_{shot}shot.pth so runs with other k do not replace each other",
    )
    return p


def main(argv=None) -> dict:
    flags = vars(parser().parse_args(argv))
    with one_line_errors():
        model_cfg, run, precision, device = configs(flags, protocol="few")
        preflight(model_cfg, run, precision, device)  # folders, checkpoint, weights, --resume's state
        setup_seed(run.seed, deterministic=run.deterministic)
        test = test_set(run, run.iterate)  # the test split and the support set
        selection = selection_set(run, test)  # all the data checked before the model is built
        model, texts = adapted_model(model_cfg, precision, device, [prompt(run)], run.text_cache_dir)
        reuse = prefix_cache(run.prefix_cache_ram, run.prefix_cache_dir)
        training = Training(model, model_cfg, run, precision)
        memory_images, _ = augment(test.support.normal)  # [11k, 3, H, W]: the normal training images too
        data = fewshot_training_set(run, test, memory_images)

        def evaluate_selection() -> tuple[dict, Collected]:
            return evaluate_set(
                model, selection, texts[prompt(run)], run, precision, memory_images, pixel_extras=False
            )

        def evaluate_test() -> tuple[dict, Collected]:
            return evaluate_set(model, test, texts[prompt(run)], run, precision, memory_images)

        with serving(model, reuse):  # the same augmented images every epoch, batch 1: their prefixes reused
            training.fit(data, texts, evaluate_selection)
        return training.finish("train_few", evaluate_test)


if __name__ == "__main__":
    main()
