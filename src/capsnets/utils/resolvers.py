"""OmegaConf resolvers used by the configs (registered on import)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

#: repository root: src/capsnets/utils/resolvers.py -> parents[3]
PROJECT_ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """``${capsnets_root:}`` -> the repository root (where conf/, data/ and outputs/ live)."""
    if not OmegaConf.has_resolver("capsnets_root"):
        OmegaConf.register_new_resolver("capsnets_root", lambda: str(PROJECT_ROOT))


register_resolvers()
