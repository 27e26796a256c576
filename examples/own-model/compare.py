"""The same comparison as ``fedcsg compare --config shapes.toml`` from Python (or a notebook cell):
``fedcsg.compare`` with the model factory itself, then the records it returns.

    python compare.py                 # after `python make_images.py images`
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shapenet import ShapeNet  # a module beside this script: the Ray actors import it by name

import fedcsg

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(HERE / "images"), help="the ImageFolder (make_images.py)")
    parser.add_argument("--out", default=str(HERE / "runs" / "api"), help="the run directory")
    parser.add_argument("--num-rounds", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    result = fedcsg.compare(
        HERE / "shapes.toml",
        model=ShapeNet,
        data_dir=str(Path(args.images).resolve()),
        num_rounds=args.num_rounds,
        image_size=args.image_size,
        out=args.out,
        overwrite=True,
    )
    for arm, record in result.arms.items():
        final = record["rounds"][-1]
        print(f"{arm}: accuracy {final['test_accuracy']:.3f}, {final['cum_wire_up']:,} bytes up in all")
    print(f"records and report in {result.run_dir}")
