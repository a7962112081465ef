"""Train the detection benchmark's attack encoders into a cache directory (skips those already there).

    python pipelines/train_attacks.py all                      # every attack with a CPU recipe, ~2-3 min each
    python pipelines/train_attacks.py drupe-patch-tshirt       # one attack
    python pipelines/train_attacks.py sslpoison-patch-tshirt-scratch ctrl-tshirt-scratch --device cuda --out DIR
    python pipelines/train_attacks.py --list                   # names, kinds, and what is cached

Each checkpoint (dedefilter encoder format) carries its card: recipe, seed, data, trigger, target class,
and the linear-probe attack success rate and clean accuracy measured right after training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dedefilter.attacks.registry import ATTACKS, DEFAULT_CACHE, load_or_train

GPU_ONLY = ("sslpoison-patch-tshirt-scratch", "ctrl-tshirt-scratch")  # from-scratch SimCLR: too slow for CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"attack names or 'all' (all but {', '.join(GPU_ONLY)})")
    parser.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda")
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE, help="checkpoint directory")
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    args = parser.parse_args()
    if args.list or not args.names:
        for name, spec in ATTACKS.items():
            cached = spec.kind == "bundled" or (args.out / f"{name}.pt").exists()
            print(f"{name:34s} {spec.kind:11s} {'cached' if cached else '-':7s} {spec.summary}")
        return
    names = [n for n in ATTACKS if n not in GPU_ONLY] if args.names == ["all"] else args.names
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attacks {unknown}; known: {sorted(ATTACKS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    summary = {}
    for name in names:
        _, card = load_or_train(name, args.out, args.device)
        summary[name] = {"probe": card["probe"], "spread": card.get("spread"),
                         "train_seconds": card.get("train_seconds")}
        print(json.dumps({name: summary[name]}), flush=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
