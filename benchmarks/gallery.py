"""Redraw the README's trigger gallery: one PNG per attack config under docs/gallery/,
on the standard MNIST split or the CIFAR-10 JPEGs from ../shared/data.

    python benchmarks/gallery.py [--only blend,sig] [--out docs/gallery]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, data_overrides  # noqa: E402

from backdoors.config import load_config  # noqa: E402
from backdoors.gallery import draw_gallery  # noqa: E402

# Every attack config drawn in the README (badnets stands for the pattern trigger).
CONFIGS = ("badnets", "blend", "sig", "sig_cifar", "wanet", "low_frequency", "bpp", "physical",
           "multimnist_calculator", "counting_complex", "semantic", "semantic_mnist", "edge_case",
           "trojan_nn", "adaptive_blend", "input_aware", "label_consistent", "narcissus")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated config names")
    parser.add_argument("--out", type=Path, default=REPO / "docs/gallery")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else CONFIGS
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = REPO / "configs" / f"{name}.yaml"
        config = load_config(path, data_overrides(path))
        print(f"wrote {draw_gallery(config, args.out / f'{name}.png')}", flush=True)


if __name__ == "__main__":
    main()
