"""Few-shot training: adapters trained on k augmented normal and k abnormal support images (spec 6.4).

    python train_few.py --obj Brain --shot 4
    python train_few.py --obj Liver --shot 8 --select val --shot_in_name --save_path ./ckpt/mine/
    python train_few.py --obj Chest --shot 4 --epoch 5 --precision bf16
"""
from cli import script
from fewshot import train as run, train_parser

parser, main = script(run, train_parser, __doc__)

if __name__ == "__main__":
    main()
