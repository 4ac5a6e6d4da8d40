"""Batched, device-resident molecular dynamics: many walkers as one set of tensors.

- :mod:`alflow.md.state`: :class:`~alflow.md.state.MDState` (positions, momenta, cells, thermostat and
  barostat state of every walker) and the counter-based random numbers that make a walker's
  trajectory independent of the other walkers in the batch;
- :mod:`alflow.md.integrators`: pure functions over the state (velocity Verlet, Langevin BAOAB,
  Nosé–Hoover chain, Bussi velocity rescaling, stochastic cell rescaling NPT, isotropic and anisotropic);
- :mod:`alflow.md.providers`: force providers other than a potential or committee (an ASE calculator).

Units are ASE's: Å, eV, amu, ASE time (``ase.units.fs`` per fs), K through ``ase.units.kB``.
"""
