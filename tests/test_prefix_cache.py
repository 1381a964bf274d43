"""Reuse of the frozen prefix (mvfa/prefix_cache.py): tokens through the cache equal the uncached forward bit
for bit, kept in memory or spilled to files; a training run with reuse gives the same losses, weights and
metrics as one without."""

import pytest
import torch
from conftest import SIZE, TINY_MODEL
from test_scripts import load_ckpt, only_record, run, script_args

import train_few
import train_zero
from mvfa.precision import Precision
from mvfa.prefix_cache import PrefixCache, serving
from mvfa.training import optimizers, train_step

CPU = torch.device("cpu")


def outputs(model, images):
    with torch.no_grad():
        pooled, seg, det = model(images)
    return [pooled, *seg, *det]


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("ram_gib", [4.0, 0.0], ids=["in-memory", "spilled-to-files"])
def test_brain_model_tokens_through_the_cache_equal_the_forward(brain_model, golden_image, tmp_path, ram_gib):
    """Batch 1, fp32, the reference's explicit attention: a miss and then a hit give the uncached tensors."""
    plain = outputs(brain_model, golden_image)
    cache = PrefixCache(ram_gib, tmp_path)
    with serving(brain_model, cache):
        missed = outputs(brain_model, golden_image)
        hit = outputs(brain_model, golden_image)
    assert (cache.misses, cache.hits) == (1, 1)
    assert brain_model.prefix_cache is None  # restored after the block
    assert_equal(missed, plain)
    assert_equal(hit, plain)
    spilled = list(tmp_path.rglob("*.pt"))
    assert len(spilled) == (1 if ram_gib == 0 else 0)
    del cache  # its files go with it
    assert not any(p.exists() for p in spilled)


def test_keys_tell_batches_and_autocast_apart(tmp_path):
    model = TINY_MODEL.build(CPU, Precision.of("fp32", CPU))
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    cache = PrefixCache(1.0, tmp_path)
    with serving(model, cache):
        one = outputs(model, images[:1])
        two = outputs(model, images[:2])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = outputs(model, images[:1])
        changed = images[:1].clone()
        changed[0, 0, 0, 0] += 1e-6
        outputs(model, changed)
        again = outputs(model, images[:1])
    assert (cache.misses, cache.hits) == (4, 1)  # only the repeated batch hits
    assert_equal(again, one)
    assert_equal(two, outputs(model, images[:2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_equal(bf16, outputs(model, images[:1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the fp16 autocast case")
def test_fp16_autocast_tokens_through_the_cache_equal_the_forward(brain_model, golden_image, tmp_path):
    model, image = brain_model.cuda(), golden_image.cuda()
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            plain = outputs(model, image)
            with serving(model, PrefixCache(4.0, tmp_path)):
                assert_equal(outputs(model, image), plain)
                assert_equal(outputs(model, image), plain)
    finally:
        brain_model.cpu()


def test_training_steps_with_reuse_equal_steps_without(tmp_path):
    """Three epochs over the same batch-1 images: the same losses and adapter weights, step by step."""
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    masks = (torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) > 0.7).float()
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    text = torch.randn(256, 2, generator=torch.Generator().manual_seed(3))
    fp32 = Precision.of("fp32", CPU)
    runs = []
    for cache in (None, PrefixCache(1.0, tmp_path)):
        torch.manual_seed(0)
        model = TINY_MODEL.build(CPU, fp32)
        opts = optimizers(model, 0.001)
        losses = []
        with serving(model, cache):
            for _ in range(3):
                for i in range(4):
                    step = (images[i : i + 1], labels[i : i + 1], masks[i : i + 1], text)
                    losses.append(
                        train_step(
                            model, *step, has_masks=True, optimizers=opts, precision=fp32, img_size=SIZE
                        )
                    )
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items() if "adapters" in k}))
    (plain_losses, plain_weights), (reused_losses, reused_weights) = runs
    assert reused_losses == plain_losses
    assert all(torch.equal(reused_weights[k], plain_weights[k]) for k in plain_weights)
    assert (cache.misses, cache.hits) == (4, 8)


@pytest.mark.parametrize("script", [train_few, train_zero], ids=["train_few", "train_zero"])
def test_a_run_with_reuse_equals_one_without(script, synth, tmp_path):  # noqa: F811
    """The scripts reuse by default; --no_prefix_cache recomputes: the same printed lines, record, losses and
    checkpoint tensors."""
    results = []
    obj = "Brain" if script is train_few else "Liver"
    more = ["--shot", "1"] if script is train_few else ["--batch_size", "2"]
    seed_dir = synth.seed_root if script is train_few else None
    for name, extra in (("reuse", []), ("plain", ["--no_prefix_cache"])):
        args = script_args(synth.data, tmp_path / name, obj, "--epoch", "2", *more, *extra, seed_dir=seed_dir)
        out, result = run(script, [*args, "--cache_dir", str(tmp_path / "cache")])
        record = only_record(tmp_path / name / "results")
        ckpt = load_ckpt(tmp_path / name / "ckpt" / f"{obj}.pth")
        results.append((out, result, record["training"]["epoch_losses"], ckpt))
    (out, result, losses, ckpt), (plain_out, plain_result, plain_losses, plain_ckpt) = results
    assert (out, result, losses) == (plain_out, plain_result, plain_losses)
    assert ckpt["epoch"] == plain_ckpt["epoch"]
    for head in ("seg_adapters", "det_adapters"):
        assert ckpt[head].keys() == plain_ckpt[head].keys()
        assert all(torch.equal(ckpt[head][k], plain_ckpt[head][k]) for k in ckpt[head])
    assert not list((tmp_path / "cache" / "prefix").rglob("*.pt"))  # nothing left behind
