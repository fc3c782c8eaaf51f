"""flow: a dependency-driven, stateless dataflow for medical image retrieval indices."""

from flow.errors import ItemError
from flow.keys import Key, key
from flow.node import Items, Node, node
from flow.reporting import progress
from flow.values import Blob

__all__ = ["Blob", "ItemError", "Items", "Key", "Node", "key", "node", "progress"]
__version__ = "0.1.0"
