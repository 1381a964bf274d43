"""The configs a script builds once from its flags: the model, the run, the precision and the device."""

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from CLIP import CLIP_Inplanted, create_model
from CLIP.loading import default_checkpoint
from dataset import dataset_name
from utils import BadValue

from .precision import Precision


@dataclass(frozen=True)
class ModelConfig:
    """The adapted CLIP: architecture, input resolution, weights, activation, attention path, adapted
    blocks."""

    model_name: str = "ViT-L-14-336"
    pretrain: str = "openai"  # 'openai': read clip_ckpt; 'none': random weights (tests, demo)
    clip_ckpt: str | None = None
    img_size: int = 240
    features_list: tuple[int, ...] = (6, 12, 18, 24)  # 1-based numbers of the blocks followed by adapters
    quick_gelu: bool = False
    fast: bool = False  # fused attention and text prompts over their own length

    @property
    def clip_file(self) -> Path | None:
        """The CLIP weights file read (None for random weights)."""
        if self.pretrain == "none":
            return None
        return Path(self.clip_ckpt or default_checkpoint(self.model_name))

    def build(self, device: torch.device, precision: Precision) -> CLIP_Inplanted:
        """CLIP (frozen, eval mode) with fresh adapters after `features_list`, on `device`."""
        clip = create_model(
            self.model_name,
            self.img_size,
            self.pretrain,
            device,
            checkpoint=self.clip_ckpt,
            quick_gelu=self.quick_gelu,
            fused=self.fast or precision.fused_attention,
        )
        # deviation: the reference asks gradients for the frozen backbone too, which only costs time
        clip.requires_grad_(False)
        return CLIP_Inplanted(clip, self.features_list).to(device)


# A RunConfig field so marked cannot change what a run trains or saves: --resume may give it another value.
# Every other field, of both configs, defines the run (a resumed run must have it as the state's run had it);
# --save_path names the folder the state was found in.
NEUTRAL = {"result": False}


def neutral(default):
    """A field that changes no result (where files go, how many workers, the caches, what may be replaced)."""
    return field(default=default, metadata=NEUTRAL)


def read_by_tests(default):
    """A field only the test scripts read: it changes a test's result, never what a training trains or
    saves, so a training state's identity leaves it out (as it leaves out the neutral fields)."""
    return field(default=default, metadata=NEUTRAL)


@dataclass(frozen=True)
class RunConfig:
    """What a run does with the model: protocol, data, support set, selection, optimiser, seeds and
    outputs."""

    protocol: str  # 'few' or 'zero'
    obj: str
    prompt_name: str | None = None
    data_path: str = "./data/"
    img_size: int = 240
    clip_normalize: bool = False
    sort_listing: bool = False
    seed: int = 111
    num_workers: int = neutral(0)
    batch_size: int = 1
    out_dir: str = neutral("./results/")
    # few-shot: the support set and the memory bank
    shot: int = 4
    iterate: int | tuple[int, ...] = 0
    seed_dir: str | None = None
    memory_no_cls: bool = False
    # the tests' protocol: 'mvfa' (k normal + k abnormal, few-shot adapters) or 'normal' (the k normal images
    # alone, zero-shot adapters); how scores are normalised: 'test' (min-max over the test set, the
    # reference's) or 'support' (fitted on normal images only: the normal support, leave-one-out, and the
    # images of `calibration`)
    support: str = read_by_tests("mvfa")
    normalize: str = read_by_tests("test")
    calibration: str | None = read_by_tests(None)
    # the adapter checkpoint read (tests) or written (training)
    save_path: str = neutral("./ckpt/few-shot/")
    ckpt: str | None = None
    shot_in_name: bool = False
    # training
    epoch: int = 50
    learning_rate: float = 0.001
    save_model: int = 1
    overwrite: bool = neutral(False)
    resume: bool = neutral(False)
    init_ckpt: str | None = None
    select: str = "test"
    deterministic: bool = False
    bce_on_probability: bool = False
    # text features kept between runs
    cache_dir: str | None = neutral(None)
    no_text_cache: bool = neutral(False)
    # the frozen prefix's tokens reused within a training run
    no_prefix_cache: bool = neutral(False)
    prefix_cache_ram: float = neutral(4.0)
    # outputs of a test
    save_maps: str | None = None
    grid_n: int = 8
    save_scores: str | None = None
    # the command line's values as given, which checkpoints and run records keep; never read to decide
    arguments: dict = field(default_factory=dict, metadata=NEUTRAL, compare=False, repr=False)

    @property
    def fewshot(self) -> bool:
        return self.protocol == "few"

    @property
    def name(self) -> str:
        """The dataset's name in file names and printed lines."""
        return dataset_name(self.obj)

    @property
    def text_cache_dir(self) -> Path | None:
        """The text-feature cache folder; None when --no_text_cache."""
        return cache_folder(self.cache_dir, self.no_text_cache)

    @property
    def prefix_cache_dir(self) -> Path | None:
        """Where a training run's reused prefix tokens beyond --prefix_cache_ram go; None when
        --no_prefix_cache."""
        return cache_folder(self.cache_dir, self.no_prefix_cache)

    @property
    def checkpoint(self) -> Path:
        """The adapter checkpoint: --ckpt, else `{save_path}/{obj}.pth` (`{obj}_{shot}shot.pth` with
        --shot_in_name), as the reference names it."""
        if self.ckpt:
            return Path(self.ckpt)
        stem = f"{self.name}_{self.shot}shot" if self.shot_in_name else self.name
        return Path(self.save_path) / f"{stem}.pth"


def cache_folder(cache_dir: str | None, off: bool = False) -> Path | None:
    """--cache_dir, else $XDG_CACHE_HOME/mvfa, else ~/.cache/mvfa; None when that cache is turned off."""
    if off:
        return None
    return (
        Path(cache_dir)
        if cache_dir
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mvfa"
    )


def pick(config: type, flags: dict):
    """A config of the flags that are its fields (features_list and iterate as tuples); the others are
    left."""
    names = {f.name for f in fields(config)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items() if k in names}
    return config(**values)


def result_fields(config) -> dict:
    """The fields of a config that can change a run's result, by name (sequences as lists, as flags give
    them)."""
    return {
        f.name: list(value) if isinstance(value := getattr(config, f.name), tuple) else value
        for f in fields(config)
        if f.metadata.get("result", True)
    }


def configs(
    flags: dict, protocol: str, beside: tuple[str, ...] = ()
) -> tuple[ModelConfig, RunConfig, Precision, torch.device]:
    """The parsed flags of a script, once, as its configs; a flag that belongs to none is an error, but for
    those named in `beside` (a tool's own, which it reads itself). RunConfig.arguments keeps them all."""
    model_keys = {f.name for f in fields(ModelConfig)}
    run_keys = {f.name for f in fields(RunConfig)} - {"protocol", "arguments"}
    unknown = set(flags) - model_keys - run_keys - {"device", "precision", *beside}
    if unknown:
        raise ValueError(f"no config takes the flag(s) {', '.join(sorted(unknown))}")
    own = {k: v for k, v in flags.items() if k not in beside}
    model = pick(ModelConfig, own)
    run = pick(RunConfig, {**own, "protocol": protocol, "arguments": flags})
    device = resolve_device(flags.get("device", "auto"))
    precision = Precision.of(flags.get("precision", "auto"), device)
    return model, run, precision, device


def resolve_device(name: str | None) -> torch.device:
    """'auto' or None -> cuda when available, else cpu; anything else is checked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadValue(f"{name}: CUDA is not available on this machine (use cpu)", flag="device")
    return device
