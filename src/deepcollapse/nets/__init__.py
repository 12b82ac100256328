"""Real networks: offline data loaders (:mod:`.data`), backbones with a DUFM head (:mod:`.models`) and
their training with DNC measured along the way (:mod:`.train`)."""
