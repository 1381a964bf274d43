"""Zero-shot training: adapters trained on the test splits of the five other BMAD datasets (leave one out).

python train_zero.py --obj Liver
python train_zero.py --obj Brain --select val --save_path ./ckpt/mine/
"""

import argparse

from mvfa.config import configs
from mvfa.evaluation import Collected, evaluate_set
from mvfa.flags import add_sort_listing_arg, add_training_args, new_parser, one_line_errors
from mvfa.prefix_cache import prefix_cache, serving
from mvfa.protocol import prompt, selection_set, test_set, zeroshot_training_set
from mvfa.resume import preflight
from mvfa.seeding import setup_seed
from mvfa.text_cache import adapted_model
from mvfa.training import Training


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__, obj="Retina_RESC")
    add_training_args(p, lr=0.0001, save_path="./ckpt/zero-shot/")
    add_sort_listing_arg(p, "the training images are shuffled into groups")
    return p


def main(argv=None) -> dict:
    flags = vars(parser().parse_args(argv))
    with one_line_errors():
        model_cfg, run, precision, device = configs(flags, protocol="zero")
        preflight(model_cfg, run, precision, device)  # folders, checkpoint, weights, --resume's state
        setup_seed(run.seed, deterministic=run.deterministic)
        data = zeroshot_training_set(run)  # grouped with the global `random`, as the reference
        test = test_set(run)
        selection = selection_set(run, test)  # deviation: --select val chooses on the valid split
        model, texts = adapted_model(
            model_cfg, precision, device, [*data.texts, prompt(run)], run.text_cache_dir
        )
        reuse = prefix_cache(run.prefix_cache_ram, run.prefix_cache_dir)
        training = Training(model, model_cfg, run, precision)

        def evaluate_selection() -> tuple[dict, Collected]:
            # the same batches at every evaluation: their prefixes reused (the training groups change)
            with serving(model, reuse):
                return evaluate_set(model, selection, texts[prompt(run)], run, precision, pixel_extras=False)

        def evaluate_test() -> tuple[dict, Collected]:
            return evaluate_set(model, test, texts[prompt(run)], run, precision)

        training.fit(data, texts, evaluate_selection)
        return training.finish("train_zero", evaluate_test)


if __name__ == "__main__":
    main()
