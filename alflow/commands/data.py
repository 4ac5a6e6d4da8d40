"""``alflow data``: inspect, import, export, split, compact labelled datasets and fit E0.

PATH arguments accept a dataset directory or any file ``alflow.io.read_frames`` reads.
Bad input prints one line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ase import Atoms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("summary", help="frames, compositions, label ranges of a dataset dir or a file")
    p.add_argument("path", help="dataset directory or structure file")
    p = sub.add_parser("import", help="import labelled frames from files into a dataset (created if absent)")
    p.add_argument("dataset", help="dataset directory")
    p.add_argument("files", nargs="+", help="extxyz, ASE db, OUTCAR, vasprun.xml, ... with energies and forces")
    p.add_argument("--source", default="file", help="provenance tag stored in info['source'] (default: file)")
    p.add_argument("--species", nargs="+", default=None, help="allowed elements, e.g. Cu O")
    p = sub.add_parser("export", help="write all frames of a dataset to one extxyz file (for mace-torch)")
    p.add_argument("dataset", help="dataset directory")
    p.add_argument("out", help="output .extxyz file")
    p = sub.add_parser("e0", help="least-squares per-element reference energies (eV)")
    p.add_argument("path", help="dataset directory or labelled file")
    p = sub.add_parser("split", help="train/valid/test split sizes; with --out write the three extxyz files")
    p.add_argument("path", help="dataset directory or labelled file")
    p.add_argument("--fractions", nargs=3, type=float, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VALID", "TEST"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for train.extxyz, valid.extxyz, test.extxyz")
    p = sub.add_parser("compact", help="merge a dataset's shards into one")
    p.add_argument("dataset", help="dataset directory")


def _load(path: str) -> list[Atoms]:
    from alflow.data import Dataset, read_frames

    p = Path(path)
    if p.is_dir():
        return Dataset(p, create=False).frames()
    return read_frames(p)


def _run(args: argparse.Namespace) -> int:
    from ase.data import chemical_symbols

    from alflow.data import Dataset, fit_e0, format_summary, split, summary
    from alflow.io import write_extxyz_atomic

    if args.action == "summary":
        print(format_summary(summary(_load(args.path)), title=str(args.path)))
    elif args.action == "import":
        for f in args.files:  # fail before touching the dataset when a file is missing
            if not Path(f).is_file():
                raise FileNotFoundError(f"{f}: no such file")
        ds = Dataset(args.dataset, species=args.species)
        for f in args.files:
            added = ds.import_file(f, source=args.source)
            print(f"{f}: {added} new frame(s)")
        print(f"{args.dataset}: {len(ds)} frame(s)")
    elif args.action == "export":
        n = Dataset(args.dataset, create=False).export_extxyz(args.out)
        print(f"wrote {n} frame(s) to {args.out}")
    elif args.action == "e0":
        for z, e in fit_e0(_load(args.path)).items():
            print(f"{chemical_symbols[z]:<3} {z:>3} {e: .8f} eV")
    elif args.action == "split":
        frames = _load(args.path)
        parts = dict(zip(("train", "valid", "test"), split(frames, args.fractions, args.seed)))
        for name, idx in parts.items():
            print(f"{name:<6} {len(idx)}")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            for name, idx in parts.items():
                write_extxyz_atomic([frames[i] for i in idx], Path(args.out) / f"{name}.extxyz")
    elif args.action == "compact":
        n = Dataset(args.dataset, create=False).compact()
        print(f"merged {n} shard(s)" if n else "nothing to compact")
    return 0


def run(args: argparse.Namespace) -> int:
    from alflow.data import DatasetError

    try:
        return _run(args)
    except (DatasetError, ValueError, OSError) as err:  # DatasetError is a ValueError; bad paths are OSErrors
        print(f"alflow data {args.action}: {err}", file=sys.stderr)
        return 2
