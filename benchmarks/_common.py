"""Helpers shared by the benchmark scripts (not a benchmark itself)."""

import importlib
import importlib.util
import sys
from pathlib import Path


def load_checkout(checkout: Path, package: str = "hf_sparsemoe_vlm_baseline"):
    """The modeling and configuration modules of another checkout of this repository, imported under a package
    name of their own (`package`) so that they sit next to the installed package.

    Make one with `git worktree add /tmp/base <commit>` and pass `/tmp/base`."""
    source = Path(checkout) / "hf_sparsemoe_vlm"
    if not (source / "__init__.py").is_file():
        raise FileNotFoundError(f"{checkout} is not a checkout of this repository: {source / '__init__.py'} is missing")
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(package, source / "__init__.py",
                                                      submodule_search_locations=[str(source)])
        sys.modules[package] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[package])
    return (importlib.import_module(f"{package}.modeling_sparsemoe_vlm"),
            importlib.import_module(f"{package}.configuration_sparsemoe_vlm"))
