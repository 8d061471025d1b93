"""capsnets: capsule networks (dynamic routing and EM routing) with Hydra and Lightning."""

__version__ = "0.1.0"
