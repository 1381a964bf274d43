"""Few-shot test: text comparison fused with a memory bank of augmented support images (spec 6.5-6.7).

    python test_few.py --obj Brain --shot 4
    python test_few.py --obj Chest --shot 4 --iterate 0 --precision bf16 --batch_size 8
    python test_few.py --obj Liver --shot 4 --iterate 0 1 2    # three support lists: mean ± std
"""
from cli import script
from fewshot import test as run, test_parser

parser, main = script(run, test_parser, __doc__)

if __name__ == "__main__":
    main()
