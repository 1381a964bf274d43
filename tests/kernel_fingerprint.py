"""Which family of CPU kernels this machine computes with: a short probe of the last bits.

A recording replays bit for bit only on a machine whose kernels round as the recording machine's did. The
capability string torch reports (`AVX512`, `AVX2`) does not tell: an Intel and an AMD CPU both report `AVX512`
and round differently (MKL takes other code paths per vendor), and the thread count splits some sums
differently. So each recording carries a fingerprint: the SHA-256 prefix of what the kinds of arithmetic a
training uses (linear layers, layer norm, GELU, softmax, attention products, the patch convolution,
bilinear upsampling, backward and an Adam step) return on fixed inputs. Two machines with the same
fingerprint give the same bits in a training; a different fingerprint means another kernel family.

    python tests/kernel_fingerprint.py                  # the fingerprints of this machine's settings
    python tests/kernel_fingerprint.py --threads 1      # one line: the fingerprint of this process's setting

The probe runs in a fresh process per setting, because torch, MKL and oneDNN read their variables at start.
"""

import argparse
import functools
import hashlib
import os
import subprocess
import sys

# Settings that keep the libraries to their AVX2 paths: on an AVX-512 CPU of the recording's vendor they can
# reproduce an AVX2 recording (an AMD AVX-512 CPU under these gives the bits of an AMD AVX2 one)
AVX2_PATHS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SETTINGS = {"native": {}, "avx2-paths": AVX2_PATHS}


def probe() -> str:
    """The fingerprint of this process's kernels: 16 hex digits."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)

    def draw(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    tokens = draw(2, 290, 1024).requires_grad_()  # two images' ViT-L tokens
    linear = torch.nn.Linear(1024, 3072)
    patches = torch.nn.Conv2d(3, 1024, 14, 14, bias=False)
    with torch.no_grad():
        for weight in (linear.weight, linear.bias, patches.weight):
            weight.copy_(draw(*weight.shape, scale=0.02))
    image = torch.rand(1, 3, 240, 240, generator=generator)
    adam = torch.optim.Adam(linear.parameters(), lr=1e-3, betas=(0.5, 0.999))

    hidden = F.gelu(linear(F.layer_norm(tokens, (1024,))))  # [2, 290, 3072]
    queries = hidden[..., :64]
    attention = torch.softmax(queries @ queries.transpose(1, 2) / 8, dim=-1)  # [2, 290, 290]
    grid = attention[:, 1:, 0].reshape(2, 1, 17, 17)  # the patch grid of a 240-pixel image
    upsampled = F.interpolate(grid, size=240, mode="bilinear", align_corners=True)  # [2, 1, 240, 240]
    embedded = patches(image)  # [1, 1024, 17, 17]
    loss = (attention @ hidden).square().mean() + embedded.square().mean() + upsampled.mean()
    loss.backward()
    adam.step()

    digest = hashlib.sha256()
    for tensor in (loss, hidden, attention, upsampled, embedded, tokens.grad, linear.weight):
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@functools.cache
def fingerprint(setting: str = "native", threads: int = 1) -> str:
    """The fingerprint of this machine under SETTINGS[setting] with `threads` torch threads (a fresh
    process; cached for the session)."""
    env = {**os.environ, **SETTINGS[setting], **thread_environment(threads)}
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def thread_environment(threads: int) -> dict:
    """The variables that give torch, MKL and OpenMP `threads` threads in a new process."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def matching_setting(recorded: str, threads: int) -> str | None:
    """The setting under which this machine computes as the machine of fingerprint `recorded` did, or None
    (another kernel family)."""
    return next((name for name in SETTINGS if fingerprint(name, threads) == recorded), None)


def describe(threads: int) -> str:
    """This machine's fingerprints, for a skip reason."""
    return ", ".join(f"{fingerprint(name, threads)} ({name})" for name in SETTINGS)


def cpu_name() -> str:
    """Vendor model, family/model numbers and the widest vector instructions, from /proc/cpuinfo."""
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    flags = fields.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = ", bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else ""
    return (
        f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')} model "
        f"{fields.get('model', '?')}, {isa}{bf16})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="probe this process's setting with this many threads")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        print(probe())
        return
    import torch

    print(f"{cpu_name()}; torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}")
    for name in SETTINGS:
        for threads in (1, 2):
            print(f"{name:12s} threads {threads}: {fingerprint(name, threads)}")


if __name__ == "__main__":
    main()
