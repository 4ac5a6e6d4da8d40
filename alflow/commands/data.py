"""``alflow data``: inspect, import, export, split, compact labelled datasets, remove frames, fit E0.

``import`` reports, per file, new frames, frames already stored with the same labels, and
conflicts (a stored structure with other labels: not stored, each named). ``list`` and
``remove`` select frames by index, hash prefix or ``--where KEY OP VALUE`` (computed keys
``max_force`` eV/Å, ``energy`` eV, ``energy_per_atom``, ``n_atoms``, ``formula``, ``hash``, or any
info key such as ``source``, ``walker``, ``labeller``); ``remove`` is crash-safe (a journal) and
``--dry-run`` only lists.

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
    for name, text in (("list", "list frames (index, hash, formula, energy, max |F|), optionally selected"),
                       ("remove", "remove frames by index, hash or condition (crash-safe)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("dataset", help="dataset directory")
        p.add_argument("--index", nargs="+", type=int, default=[], help="frame positions as `alflow data list` shows")
        p.add_argument("--hash", nargs="+", default=[], help="frame hashes or unique prefixes (>= 8 hex digits)")
        p.add_argument("--where", action="append", default=[], metavar="KEY OP VALUE",
                       help="condition, e.g. 'max_force>50', 'source=md', 'walker=3'; repeatable (all must hold)")
        if name == "remove":
            p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")


def _frame_line(i: int, atoms: Atoms) -> str:
    from alflow.data import _frame_value
    from alflow.keys import FRAME_HASH, SOURCE

    fmax = _frame_value(atoms, "max_force")
    energy = _frame_value(atoms, "energy_per_atom")
    return (f"{i:>6}  {atoms.info[FRAME_HASH][:12]}  {atoms.get_chemical_formula(mode='hill'):<14} "
            f"{'-' if energy is None else format(energy, '.6f'):>12}  {'-' if fmax is None else format(fmax, '.3f'):>10}  "
            f"{atoms.info.get(SOURCE, '-')}")


def _chosen(ds, args: argparse.Namespace) -> list[int]:
    """Positions selected by --index / --hash / --where (all frames for `list` with none given)."""
    from alflow.data import DatasetError
    from alflow.keys import FRAME_HASH

    frames = ds.frames()
    if not (args.index or args.hash or args.where):
        if args.action == "remove":
            raise DatasetError("name the frames to remove with --index, --hash or --where (see `alflow data list`)")
        return list(range(len(frames)))
    explicit: set[int] = set()
    for i in args.index:
        if not 0 <= i < len(frames):
            raise DatasetError(f"{ds.path}: no frame {i}; expected an index in 0..{len(frames) - 1}")
        explicit.add(i)
    for prefix in args.hash:
        found = [i for i, a in enumerate(frames) if a.info[FRAME_HASH].startswith(prefix.lower())]
        if len(prefix) < 8 or len(found) != 1:
            raise DatasetError(f"{ds.path}: hash {prefix!r} matches {len(found)} frame(s); expected one "
                               f"(a full hash or a unique prefix of >= 8 hex digits)")
        explicit.add(found[0])
    if not args.where:
        return sorted(explicit)
    matching = set(ds.select(args.where))
    return sorted(explicit & matching if (args.index or args.hash) else matching)  # --where narrows a choice


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
        n_conflicts = 0
        for f in args.files:
            rep = ds.import_report(f, source=args.source)
            print(f"{f}: {rep.n_new} new frame(s), {rep.n_same} already stored with the same labels, "
                  f"{len(rep.conflicts)} conflict(s)")
            for conflict in rep.conflicts:
                print(f"  conflict: {conflict}")
            n_conflicts += len(rep.conflicts)
        print(f"{args.dataset}: {len(ds)} frame(s)")
        if n_conflicts:
            print(f"alflow data import: {n_conflicts} frame(s) not imported: their structures are stored with other "
                  f"labels (listed above); remove the stored ones first (`alflow data remove {args.dataset} --hash "
                  f"HASH`) to replace them", file=sys.stderr)
            return 1
    elif args.action in ("list", "remove"):
        ds = Dataset(args.dataset, create=False)
        chosen = _chosen(ds, args)
        frames = ds.frames()
        if args.action == "list" or args.dry_run:
            print(f"{'index':>6}  {'hash':<12}  {'formula':<14} {'E/atom (eV)':>12}  {'max|F| eV/Å':>10}  source")
            for i in chosen:
                print(_frame_line(i, frames[i]))
            if args.action == "remove":
                print(f"would remove {len(chosen)} of {len(frames)} frame(s) (dry run: nothing removed)")
        else:
            removed = ds.remove(indices=chosen)
            for i, atoms in zip(chosen, removed):
                print(f"removed {_frame_line(i, atoms).strip()}")
            print(f"{args.dataset}: removed {len(removed)} frame(s), {len(ds)} left")
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
