"""Physics gates for convergence: a property computed with the committee mean and with the oracle, compared.

A gate is three pure steps, so the oracle half can go through the normal labelling
machinery (``alflow.label``: counted in the budget, kept in the dataset) and the model
half through any ASE calculator (``alflow.calculator.AlflowCalculator``):

1. ``structures(name, spec, atoms)``: the structures the gate needs (deterministic, so the
   same frames, and the same frame hashes, every iteration: labels are paid once);
2. ``quantity(name, spec, atoms, props)``: the property from each structure's
   energy (eV), forces (eV/Å) and stress (eV/Å³, Voigt, ASE sign), given as ``Props``
   either from a calculator (``evaluate``) or from stored labels (``from_labels``);
3. ``compare(name, spec, model, reference)``: a frozen ``GateResult`` (errors vs tolerances).

The gates (the table ``GATES``; configuration ``loop.gates``, ``alflow.config.GatesConfig``):

- ``eos``: energies of ``points`` isotropically scaled copies (linear strain in
  [-strain, +strain]), fitted by ``ase.eos.EquationOfState`` (Birch–Murnaghan by default):
  equilibrium volume V0 (Å³/atom, relative error vs ``tol_volume``), bulk modulus B (GPa,
  relative error vs ``tol_bulk_modulus``) and optionally the largest energy error on the
  curve (eV/atom vs ``tol_energy``);
- ``elastic``: clamped-ion elastic constants C_ij (GPa, 6×6 Voigt) by central finite
  differences of the stress under ±``delta`` strain in each of the six Voigt components
  (12 structures): C_ij = (σ_i(+δ) − σ_i(−δ)) / 2δ with engineering shear strains.
  Error: the largest |ΔC_ij| in GPa (vs ``tol_gpa``) and relative to the largest |C_ij| of
  the oracle (vs ``tol``);
- ``phonons``: harmonic frequencies (THz) at ``qpoints`` (fractional, of the gate
  structure's reciprocal cell) from finite-displacement force constants by phonopy on a
  ``supercell``; error: the largest |Δν| over q-points and bands vs ``tol_thz``;
- ``rdf``: the radial distribution function g(r) up to ``rmax`` (Å) of a seeded Langevin MD run
  at ``temperature`` (K) (``alflow.gate_md``), once with the committee and once with the oracle
  (its sampled frames are labels); its one "structure" is the start of both runs (the gate
  structure repeated until the cell is wider than 2 ``rmax``). Error: ∫|Δg| dr / ∫ g_oracle dr
  vs ``tol`` and optionally the shift of the first peak (Å) vs ``tol_peak``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.units import GPa

GATES = ("eos", "elastic", "phonons", "rdf")  # the gate table: name -> (structures, quantity, compare) below
PHONOPY_HINT = "pip install phonopy (or the extra: pip install 'alflow[phonons]')"


@dataclass(frozen=True)
class Props:
    """What a gate reads of one structure: energy (eV), forces (N, 3) eV/Å, stress (6,) eV/Å³ Voigt or None."""

    energy: float
    forces: np.ndarray
    stress: np.ndarray | None = None


@dataclass(frozen=True)
class GateResult:
    """One gate compared: ``passed`` when every checked error is within its tolerance.

    ``errors`` and ``tolerances`` share keys (units in the key: ``_rel`` a fraction, ``_gpa``,
    ``_ev_per_atom``, ``_thz``); ``model`` and ``reference`` hold the property's summary values;
    ``ratio`` is the largest error / tolerance (≤ 1 passes; None when nothing could be compared).
    """

    name: str
    passed: bool
    errors: dict[str, float]
    tolerances: dict[str, float]
    model: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | GateResult) -> GateResult:
        if isinstance(data, GateResult):
            return data
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(data).items() if k in known})

    def describe(self) -> str:
        """One line: held/FAILED and each error against its tolerance."""
        parts = [f"{k} {self.errors[k]:.3g} {'<=' if self.errors[k] <= t else '>'} {t:.3g}"
                 for k, t in self.tolerances.items() if k in self.errors]
        word = "held" if self.passed else "FAILED"
        return f"{self.name} {word} ({', '.join(parts) or self.message})"


def _spec(spec: Any) -> dict[str, Any]:
    return spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)


# ----------------------------------------------------------------------------------------- props


def evaluate(frames: Sequence[Atoms], calc: Any, stress: bool = True) -> list[Props]:
    """Energy, forces (and stress for 3D-periodic cells) of each frame with ASE calculator ``calc``."""
    out = []
    for atoms in frames:
        a = atoms.copy()
        a.calc = calc
        s = np.asarray(a.get_stress(voigt=True), float) if stress and a.pbc.all() else None
        out.append(Props(float(a.get_potential_energy()), np.asarray(a.get_forces(), float), s))
    return out


def from_labels(frames: Sequence[Atoms]) -> list[Props]:
    """``Props`` from labelled frames (``REF_energy``, ``REF_forces``, ``REF_stress``; alflow.keys)."""
    from alflow.keys import REF_ENERGY, REF_FORCES, REF_STRESS
    from alflow.voigt import to_voigt

    out = []
    for atoms in frames:
        s = atoms.info.get(REF_STRESS)
        out.append(Props(float(atoms.info[REF_ENERGY]), np.asarray(atoms.arrays[REF_FORCES], float),
                         None if s is None else to_voigt(np.asarray(s, float))))
    return out


# ----------------------------------------------------------------------------------------- EOS


def eos_structures(atoms: Atoms, strain: float = 0.04, points: int = 7) -> list[Atoms]:
    """``points`` copies of ``atoms`` with every length scaled by 1 + s, s evenly in [-strain, strain]."""
    out = []
    for s in np.linspace(-strain, strain, points):
        a = atoms.copy()
        a.calc = None
        a.set_cell(np.asarray(atoms.cell) * (1.0 + s), scale_atoms=True)
        out.append(a)
    return out


def eos_fit(volumes: Sequence[float], energies: Sequence[float], n_atoms: int,
            eos: str = "birchmurnaghan") -> dict[str, float]:
    """V0 (Å³/atom), E0 (eV/atom) and B (GPa) of an E–V curve (``ase.eos.EquationOfState``)."""
    import warnings

    from ase.eos import EquationOfState

    with warnings.catch_warnings():  # a minimum outside the sampled volumes: the fit's V0 says so, the gate fails
        warnings.simplefilter("ignore", UserWarning)
        v0, e0, b = EquationOfState(list(volumes), list(energies), eos=eos).fit()
    return {"v0": float(v0) / n_atoms, "e0": float(e0) / n_atoms, "bulk_modulus_gpa": float(b) / GPa}


def eos_quantity(spec: Any, atoms: Atoms, props: Sequence[Props]) -> dict[str, Any]:
    s = _spec(spec)
    frames = eos_structures(atoms, s["strain"], s["points"])
    n = len(atoms)
    fit = eos_fit([f.get_volume() for f in frames], [p.energy for p in props], n, s.get("eos", "birchmurnaghan"))
    return {**fit, "energies_per_atom": [p.energy / n for p in props],
            "volumes_per_atom": [f.get_volume() / n for f in frames]}


def eos_compare(spec: Any, model: dict[str, Any], reference: dict[str, Any]) -> GateResult:
    s = _spec(spec)
    errors = {"volume_rel": abs(model["v0"] - reference["v0"]) / abs(reference["v0"]),
              "bulk_modulus_rel": abs(model["bulk_modulus_gpa"] - reference["bulk_modulus_gpa"])
              / abs(reference["bulk_modulus_gpa"])}
    tols = {"volume_rel": s["tol_volume"], "bulk_modulus_rel": s["tol_bulk_modulus"]}
    errors["energy_ev_per_atom"] = float(np.max(np.abs(np.subtract(model["energies_per_atom"],
                                                                    reference["energies_per_atom"]))))
    if s.get("tol_energy") is not None:
        tols["energy_ev_per_atom"] = s["tol_energy"]
    return _result("eos", errors, tols, model, reference)


# ----------------------------------------------------------------------------------------- elastic


def voigt_strain(j: int, delta: float) -> np.ndarray:
    """The 3×3 symmetric strain tensor of Voigt component ``j`` (xx, yy, zz, yz, xz, xy) = ``delta``
    (engineering shear: ε_yz = δ/2)."""
    pairs = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
    a, b = pairs[j]
    e = np.zeros((3, 3))
    if a == b:
        e[a, a] = delta
    else:
        e[a, b] = e[b, a] = delta / 2
    return e


def elastic_structures(atoms: Atoms, delta: float = 0.01) -> list[Atoms]:
    """12 strained copies: Voigt component j = 0..5 at −δ then +δ (positions follow the cell: clamped ions)."""
    out = []
    for j in range(6):
        for sign in (-1.0, 1.0):
            f = np.eye(3) + voigt_strain(j, sign * delta)
            a = atoms.copy()
            a.calc = None
            a.set_cell(np.asarray(atoms.cell) @ f.T, scale_atoms=True)
            out.append(a)
    return out


def elastic_constants(stresses: Sequence[np.ndarray], delta: float) -> np.ndarray:
    """6×6 C_ij (GPa) from the stresses (eV/Å³, Voigt, ASE sign) of ``elastic_structures``, in their order."""
    s = np.asarray(stresses, float).reshape(6, 2, 6)
    return ((s[:, 1, :] - s[:, 0, :]) / (2 * delta)).T / GPa


def elastic_quantity(spec: Any, atoms: Atoms, props: Sequence[Props]) -> dict[str, Any]:
    s = _spec(spec)
    if any(p.stress is None for p in props):
        raise ValueError("elastic gate: every strained structure needs a stress (a 3D-periodic cell and a label "
                         "or a calculator with stress)")
    c = elastic_constants([p.stress for p in props], s["delta"])
    return {"c_gpa": c.round(6).tolist(), "c11": float(c[0, 0]), "c12": float(c[0, 1]), "c44": float(c[3, 3])}


def elastic_compare(spec: Any, model: dict[str, Any], reference: dict[str, Any]) -> GateResult:
    s = _spec(spec)
    cm, cr = np.asarray(model["c_gpa"]), np.asarray(reference["c_gpa"])
    worst = float(np.max(np.abs(cm - cr)))
    errors = {"c_max_gpa": worst, "c_max_rel": worst / max(float(np.max(np.abs(cr))), 1e-12)}
    tols = {}
    if s.get("tol") is not None:
        tols["c_max_rel"] = s["tol"]
    if s.get("tol_gpa") is not None:
        tols["c_max_gpa"] = s["tol_gpa"]
    return _result("elastic", errors, tols, model, reference)


# ----------------------------------------------------------------------------------------- phonons


def require_phonopy() -> Any:
    """The phonopy module, or ImportError with the install hint."""
    try:
        import phonopy
    except ImportError as err:
        raise ImportError(f"the phonons gate needs phonopy: {PHONOPY_HINT}") from err
    return phonopy


def _phonopy(atoms: Atoms, spec: dict[str, Any]) -> Any:
    require_phonopy()
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.asarray(atoms.cell),
                        scaled_positions=atoms.get_scaled_positions())
    ph = Phonopy(unit, supercell_matrix=np.diag(spec["supercell"]), primitive_matrix="P")  # q in the unit cell's basis
    ph.generate_displacements(distance=spec["distance"])
    return ph


def phonon_structures(atoms: Atoms, spec: Any) -> list[Atoms]:
    """phonopy's symmetry-reduced displaced supercells (``distance`` Å) of ``atoms`` × ``supercell``."""
    ph = _phonopy(atoms, _spec(spec))
    return [Atoms(symbols=sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
            for sc in ph.supercells_with_displacements]


def phonon_quantity(spec: Any, atoms: Atoms, props: Sequence[Props]) -> dict[str, Any]:
    s = _spec(spec)
    ph = _phonopy(atoms, s)
    ph.forces = np.asarray([p.forces for p in props])
    ph.produce_force_constants()
    done = ph.run_qpoints(np.asarray(s["qpoints"], float))  # phonopy >= 3 returns the result; 2.x keeps it
    freqs = np.asarray(done.frequencies if done is not None else ph.get_qpoints_dict()["frequencies"])
    return {"frequencies_thz": freqs.round(6).tolist(), "max_thz": float(freqs.max())}


def phonon_compare(spec: Any, model: dict[str, Any], reference: dict[str, Any]) -> GateResult:
    s = _spec(spec)
    d = np.abs(np.asarray(model["frequencies_thz"]) - np.asarray(reference["frequencies_thz"]))
    return _result("phonons", {"frequency_thz": float(d.max())}, {"frequency_thz": s["tol_thz"]}, model, reference)


# ----------------------------------------------------------------------------------------- RDF


def rdf_md(spec: Any) -> dict[str, Any]:
    """The MD settings of the rdf gate (alflow.gate_md.sample): temperature K, timestep fs, steps, samples, seed."""
    s = _spec(spec)
    return {k: s[k] for k in ("temperature", "timestep", "equilibration", "steps", "samples", "seed", "friction")}


def rdf_structures(atoms: Atoms, s: dict[str, Any]) -> list[Atoms]:
    from alflow.explore.structures import expand_to_min_width

    start = expand_to_min_width(atoms, 2.0 * s["rmax"])  # ase.geometry.rdf needs every width >= 2 rmax
    start.calc = None
    return [start]


def rdf_quantity(spec: Any, atoms: Atoms, frames: Sequence[Atoms]) -> dict[str, Any]:
    """g(r) averaged over the sampled MD ``frames`` (not Props: the RDF needs positions), and its first peak."""
    from alflow.gate_md import average_rdf

    s = _spec(spec)
    r, g = average_rdf(list(frames), s["rmax"], s["bins"])
    return {"r": r.round(5).tolist(), "g": g.round(5).tolist(), "first_peak_r": float(r[int(np.argmax(g))]),
            "frames": len(frames)}


def rdf_compare(spec: Any, model: dict[str, Any], reference: dict[str, Any]) -> GateResult:
    s = _spec(spec)
    gm, gr = np.asarray(model["g"], float), np.asarray(reference["g"], float)
    # ∫|Δg| dr / ∫ g_oracle dr on the same equal-width bins: the bin width cancels
    errors = {"rdf_l1_rel": float(np.abs(gm - gr).sum() / max(gr.sum(), 1e-12)),
              "first_peak_shift_a": abs(model["first_peak_r"] - reference["first_peak_r"])}
    tols = {"rdf_l1_rel": s["tol"]}
    if s.get("tol_peak") is not None:
        tols["first_peak_shift_a"] = s["tol_peak"]
    return _result("rdf", errors, tols, model, reference)


# ----------------------------------------------------------------------------------------- refinement


def refinement_frames(name: str, spec: Any, atoms: Atoms, n: int, seed: int, rattle: float = 0.03) -> list[Atoms]:
    """``n`` unlabelled frames near a failing gate's structures, for the oracle (``loop.gates.refine``).

    Structure gates (eos, elastic, phonons): copies of randomly chosen gate structures with a random
    isotropic strain of up to half the spacing of the EOS points (eos only) and Gaussian displacements
    of ``rattle`` Å, so the next training sees the neighbourhood of the gate's structures, not only the
    structures themselves. The rdf gate's frames are the committee's own MD frames (``_rdf_gate``).
    """
    from alflow.explore.structures import rattled, strained

    if n <= 0 or name == "rdf":
        return []
    rng = np.random.default_rng(seed)
    base = structures(name, spec, atoms)
    s = _spec(spec)
    step = 2.0 * s["strain"] / max(s["points"] - 1, 1) if name == "eos" else 0.0
    out = []
    for i in rng.choice(len(base), size=n, replace=n > len(base)):
        a = strained(base[int(i)], rng.uniform(-step / 2, step / 2)) if step else base[int(i)]
        a = rattled(a, rattle, rng)
        a.calc = None
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------- the table


def _result(name: str, errors: dict[str, float], tols: dict[str, float], model: dict, reference: dict) -> GateResult:
    errors = {k: float(v) for k, v in errors.items()}
    checked = [errors[k] / t for k, t in tols.items()]
    ok = bool(checked) and all(np.isfinite(c) and c <= 1.0 for c in checked)
    return GateResult(name=name, passed=ok, errors=errors, tolerances=dict(tols), model=model, reference=reference,
                      ratio=float(max(checked)) if checked else None)


_TABLE: dict[str, tuple[Callable[..., list[Atoms]], Callable[..., dict], Callable[..., GateResult]]] = {
    "eos": (lambda atoms, s: eos_structures(atoms, s["strain"], s["points"]), eos_quantity, eos_compare),
    "elastic": (lambda atoms, s: elastic_structures(atoms, s["delta"]), elastic_quantity, elastic_compare),
    "phonons": (lambda atoms, s: phonon_structures(atoms, s), phonon_quantity, phonon_compare),
    "rdf": (rdf_structures, rdf_quantity, rdf_compare),  # quantity takes the sampled MD frames, not Props
}
assert tuple(_TABLE) == GATES


def structures(name: str, spec: Any, atoms: Atoms) -> list[Atoms]:
    """The structures gate ``name`` evaluates (the oracle labels them once)."""
    return _TABLE[name][0](atoms, _spec(spec))


def quantity(name: str, spec: Any, atoms: Atoms, props: Sequence[Props]) -> dict[str, Any]:
    """The gate's property from the ``Props`` of ``structures(name, spec, atoms)``, in that order
    (for ``rdf``: the sampled MD frames, see ``run_gate``)."""
    return _TABLE[name][1](spec, atoms, props)


def compare(name: str, spec: Any, model: dict[str, Any], reference: dict[str, Any]) -> GateResult:
    """Model vs reference property against the gate's tolerances."""
    return _TABLE[name][2](spec, model, reference)


def run_gate(name: str, spec: Any, atoms: Atoms, model_calc: Any, reference: Any) -> GateResult:
    """Gate ``name`` of ``model_calc`` against ``reference``: an ASE calculator, or the oracle's ``Props``
    of ``structures(name, spec, atoms)`` (labels read with ``from_labels``)."""
    frames = structures(name, spec, atoms)
    if name == "rdf":  # two MD runs from the same start, same seed
        from alflow.gate_md import sample

        md = rdf_md(spec)
        ref = reference if isinstance(reference, (list, tuple)) else sample(frames[0], reference, md)
        return compare(name, spec, quantity(name, spec, atoms, sample(frames[0], model_calc, md)),
                       quantity(name, spec, atoms, ref))
    stress = name == "elastic"
    ref_props = evaluate(frames, reference, stress) if not isinstance(reference, (list, tuple)) else reference
    return compare(name, spec, quantity(name, spec, atoms, evaluate(frames, model_calc, stress)),
                   quantity(name, spec, atoms, ref_props))
