"""The example project that `lifecycle new` writes: five playbooks with their fact catalog,
policies and support roster (``rules/``), and their message templates
(``templates/messages/``).

In an installed wheel it is package data, ``engine/examples/project/``, copied there from
the repository's top-level ``rules/`` and ``templates/messages/`` when the wheel is built
(setup.py). In a source checkout (an editable install) it is those directories themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import NotFound

PACKAGED = Path(__file__).resolve().parent / "project"
CHECKOUT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ExampleProject:
    """Where the example's two directories are."""

    rules: Path
    templates: Path

    def files(self) -> list[tuple[Path, Path]]:
        """(source file, path relative to a project) for every file of the example."""
        pairs = []
        for source, relative in (
            (self.rules, Path("rules")),
            (self.templates, Path("templates/messages")),
        ):
            for path in sorted(source.rglob("*")):
                if path.is_file() and not any(
                    part.startswith(".") for part in path.parts[len(source.parts) :]
                ):
                    pairs.append((path, relative / path.relative_to(source)))
        return pairs


def example_project() -> ExampleProject:
    """The installed example, or the checkout's own; NotFound when neither is there."""
    packaged = ExampleProject(PACKAGED / "rules", PACKAGED / "templates" / "messages")
    if packaged.rules.is_dir():
        return packaged
    checkout = ExampleProject(CHECKOUT / "rules", CHECKOUT / "templates" / "messages")
    if (CHECKOUT / "pyproject.toml").is_file() and checkout.rules.is_dir():
        return checkout
    raise NotFound("example project", str(PACKAGED))
