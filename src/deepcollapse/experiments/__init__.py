"""Experiments built on everything below: one DUFM run with its files (:mod:`.dufm_run`), sweeps over
many configurations (:mod:`.sweep`) and the low-rank experiments of the follow-up (:mod:`.lowrank`)."""
