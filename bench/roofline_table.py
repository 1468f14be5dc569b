"""Write the analytic Super Apriel 15B H100 speed table (policies/roofline.py) for a model of any depth.

Each of the N layers is costed as a 15B layer on an H100 (bf16 weights and KV, fp32 states): the
small supernet's frontier "at 15B scale". Not a measurement; the fingerprint says so.

    .venv/bin/python bench/roofline_table.py --layers 8 --out router/assets/stdlib-supernet-8l/speed-h100-roofline.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.roofline import roofline_speed_dict, super_apriel_memory  # noqa: E402
from policies.tables import SpeedFile, write_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48, help="decoder layers (default 48, the 15B's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    table = SpeedFile.model_validate(roofline_speed_dict(super_apriel_memory(args.layers)))
    write_table(args.out, table)
    print(args.out)


if __name__ == "__main__":
    main()
