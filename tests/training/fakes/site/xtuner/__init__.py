"""A stand-in ``xtuner`` package: only the convert script's location matters."""
