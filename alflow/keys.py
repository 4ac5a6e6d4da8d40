"""Field names shared across alflow, as constants.

Labels live where mace-torch reads them: ``atoms.info[REF_ENERGY]`` (eV),
``atoms.arrays[REF_FORCES]`` (eV/Å, shape (N, 3)), ``atoms.info[REF_STRESS]``
(eV/Å³, Voigt (6,) or full (3, 3), ASE sign convention).
"""

# labels on ase.Atoms
REF_ENERGY = "REF_energy"
REF_FORCES = "REF_forces"
REF_STRESS = "REF_stress"

# provenance on ase.Atoms.info
SOURCE = "source"  # where the frame came from: "file", "md", "ipi", "rattle", ...
ITERATION = "iteration"  # active-learning iteration that produced it
WALKER = "walker"  # walker index / name
STEP = "step"  # MD step
LABELLER = "labeller"  # oracle name, e.g. "emt", "gpaw"
STATUS = "status"  # "labelled", "failed", ...
TIMESTAMP = "timestamp"  # ISO-8601 UTC time of labelling
FRAME_HASH = "frame_hash"  # content hash used for deduplication

# committee scores on ase.Atoms.info (explored frames)
MAX_FORCE_DEVIATION = "max_force_deviation"  # eV/Å
ENERGY_DEVIATION_PER_ATOM = "energy_deviation_per_atom"  # eV/atom
PRED_ENERGY = "pred_energy"  # committee mean energy of an explored frame (eV), info
PRED_FORCES = "pred_forces"  # committee mean forces of an explored frame (eV/Å), arrays
FORCE_DEVIATION = "force_deviation"  # per-atom DP-GEN force deviation (eV/Å), arrays
SELECTION_REASON = "selection_reason"  # why a frame was chosen for labelling, info
REJECTION_REASON = "rejection_reason"  # why a frame was kept from labelling, info

# keys of the batch dict a potential eats (dict[str, torch.Tensor])
POSITIONS = "positions"  # (N, 3) Å
NUMBERS = "numbers"  # (N,) atomic numbers, int64
CELL = "cell"  # (B, 3, 3) Å, lattice vectors as rows
PBC = "pbc"  # (B, 3) bool
EDGE_INDEX = "edge_index"  # (2, E) int64: row 0 = i (centre), row 1 = j (neighbour)
SHIFTS = "shifts"  # (E, 3) integer cell shifts S stored in the float dtype: D = r_j - r_i + S @ cell
BATCH = "batch"  # (N,) int64 structure index of each atom
N_ATOMS = "n_atoms"  # (B,) int64 atoms per structure
CHARGE = "charge"  # (B,) total charge per structure (e), from atoms.info["charge"]; 0 when absent

# outputs of a potential / committee
ENERGY = "energy"  # (B,) eV
FORCES = "forces"  # (N, 3) eV/Å
STRESS = "stress"  # (B, 3, 3) eV/Å³
NODE_ENERGY = "node_energy"  # (N,) eV
ENERGIES = "energies"  # committee: (K,) or (K, B) eV per member
FORCES_COMM = "forces_comm"  # committee: (K, N, 3)
STRESS_COMM = "stress_comm"  # committee: (K, B, 3, 3)
ENERGY_VAR = "energy_var"
FORCES_VAR = "forces_var"
