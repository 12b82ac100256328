"""Measurement: DNC metrics as pure functions of class statistics (:mod:`.metrics`), streaming
accumulators of those statistics (:mod:`.accumulate`), forward-hook probes for any PyTorch model
(:mod:`.probe`) and readers of saved features (:mod:`.readers`).

Dependency rule: this subpackage imports nothing of the DUFM, theory, nets or experiments side.
"""
