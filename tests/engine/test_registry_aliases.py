"""Other tools' names for our node types: an importer's `aliases()` reaches the catalogue as each
node's `aliases`, merged across importers; a malformed one refuses the whole pack."""

from __future__ import annotations

import pytest

import counting_pack
from nodegraph.registry import NodeRegistry


class NamingImporter:
    """An importer of a made-up format that calls Value "Number" and Sink "Show"/"Print"."""

    def __init__(self, name: str, aliases: object) -> None:
        self.name = name
        self._aliases = aliases

    def detect(self, document: object) -> bool:
        return False

    def convert(self, document: object) -> dict:
        raise AssertionError("never detects anything")

    def aliases(self) -> object:
        return self._aliases


class PlainImporter:
    name = "plain"

    def detect(self, document: object) -> bool:
        return False

    def convert(self, document: object) -> dict:
        raise AssertionError("never detects anything")


def test_importer_aliases_are_listed_in_the_catalogue_merged_and_sorted():
    registry = NodeRegistry()
    registry.add_pack("counting", counting_pack.NODES,
                      importers=[NamingImporter("one", {"Value": ["number"], "Sink": ["Show"]}), PlainImporter()])
    # A later pack's importer adds names (also for another pack's nodes), and a name twice is listed once.
    registry.add_pack("names", [], importers=[NamingImporter("two", {"Sink": ("Print", "Show"), "NotLoaded": ["X"]})])
    nodes = registry.catalogue()["nodes"]
    assert nodes["Value"]["aliases"] == ["number"]
    assert nodes["Sink"]["aliases"] == ["Print", "Show"]
    assert nodes["Add"]["aliases"] == []
    assert "NotLoaded" not in nodes
    assert registry.aliases("Sink") == ["Print", "Show"]


@pytest.mark.parametrize("aliases, problem", [
    (["Value"], "aliases() returned list"),
    ({"Value": "Number"}, "aliases() gave 'Value': 'Number'"),
    ({"Value": [""]}, "expected non-empty strings"),
    ({"Value": [3]}, "expected non-empty strings"),
])
def test_malformed_aliases_refuse_the_pack_and_name_the_importer(aliases, problem):
    registry = NodeRegistry()
    with pytest.raises(TypeError) as raised:
        registry.add_pack("counting", counting_pack.NODES, importers=[NamingImporter("bad names", aliases)])
    assert "pack 'counting'" in str(raised.value) and "importer 'bad names'" in str(raised.value)
    assert problem in str(raised.value)
    assert len(registry) == 0 and registry.importers == []  # nothing of the pack was added


def test_aliases_that_are_not_a_method_refuse_the_pack():
    importer = PlainImporter()
    importer.aliases = {"Value": ["Number"]}
    with pytest.raises(TypeError, match="`aliases` that is not a method"):
        NodeRegistry().add_pack("counting", counting_pack.NODES, importers=[importer])
