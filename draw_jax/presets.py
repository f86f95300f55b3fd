"""Named configurations: ``build_config(preset=NAME)`` and ``--preset=NAME``.

Each preset is a set of settings by flag name, applied on top of the
defaults (which are the paper's MNIST setup); flags given on the command line
apply on top of the preset. Train, benchmark, tests and the notebook all take
their configurations from here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    # Gregor et al. 2015, sec. 4.2 and Table 3 (MNIST, attention): T=64,
    # 256/256 LSTMs, z 100, read 2x2, write 5x5. The defaults are this preset.
    "paper_attention": {},
    # The same without attention (the paper's 87.40-nat row).
    "paper_no_attention": {"read_attention": False, "write_attention": False},
    # The popular blog ports' small setup (ericjang/draw: T=10, z=10).
    "small_attention": {"T": 10, "z_size": 10},
    "small_no_attention": {"T": 10, "z_size": 10, "read_attention": False, "write_attention": False},
    # Two-digit MNIST (sec. 4.3, Figure 9). The paper's Table 3 has no row for it:
    # the MNIST row (T=64, 256/256, z 100, write 5x5), with the read grid as
    # large as the write (as Table 3's SVHN and CIFAR rows pair them), since a
    # 2x2 read of a 60x60 canvas holding two digits sees too little per glimpse.
    "paper_two_digits": {"dataset": "mnist_two_digits", "read_n": 5},
    # Gregor et al. 2015, Table 3, "SVHN Generation": T=32, 800/800 LSTMs, z 100,
    # read and write 12x12 (sec. 4.4). On svhn_cropped's 32 x 32 digits, not the
    # paper's 64 x 64 crops (BUILD_NOTES: colour).
    "paper_svhn": {
        "dataset": "svhn_cropped",
        "T": 32,
        "enc_size": 800,
        "dec_size": 800,
        "z_size": 100,
        "read_n": 12,
        "write_n": 12,
    },
    # Table 3, "CIFAR Generation": T=64, 400/400 LSTMs, z 200, read and write 5x5 (sec. 4.5).
    "paper_cifar10": {
        "dataset": "cifar10",
        "T": 64,
        "enc_size": 400,
        "dec_size": 400,
        "z_size": 200,
        "read_n": 5,
        "write_n": 5,
    },
    # Seconds on a CPU: tests, the notebook's smoke run, the benchmark's self-test.
    "tiny": {"T": 4, "enc_size": 32, "dec_size": 32, "z_size": 8, "read_n": 2, "write_n": 3},
}
