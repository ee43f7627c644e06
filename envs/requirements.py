"""``python3 envs/requirements.py EXTRA...``: the requirement lines of the package with those extras (pyproject.toml).

``envs/fetch-wheels.sh`` downloads them (``gpu test``), for a GPU node that reaches no registry.
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
print("\n".join([*project["dependencies"], *(line for extra in sys.argv[1:] for line in project["optional-dependencies"][extra])]))
