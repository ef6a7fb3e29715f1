"""Socket types: the names that links are type-checked by, and which of them connect."""

from __future__ import annotations

import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args, get_origin


@dataclass(frozen=True)
class SocketType:
    """A named type of value that flows along links.

    `accepts` lists other type names whose outputs may connect to an input of this type
    (INT outputs feed FLOAT inputs, say). `json` says whether a literal value of this type can
    be written in a workflow document; link-only types (a loaded model) cannot.
    """

    name: str
    description: str = ""
    color: str = "#9e9e9e"
    accepts: tuple[str, ...] = ()
    json: bool = False

    @property
    def annotation(self) -> Any:
        """A type annotation for a node field carrying this socket type (any Python value)."""
        return Annotated[Any, self]


ANY = SocketType("*", "Any type; connects to and from everything.", "#ffffff", json=True)
INT = SocketType("INT", "Integer.", "#29b6f6", json=True)
FLOAT = SocketType("FLOAT", "Floating-point number.", "#66bb6a", accepts=("INT",), json=True)
STRING = SocketType("STRING", "Text.", "#ffca28", json=True)
BOOLEAN = SocketType("BOOLEAN", "True or false.", "#ab47bc", json=True)
ENUM = SocketType("ENUM", "One of a fixed list of choices.", "#8d6e63", accepts=("STRING",), json=True)
IMAGE = SocketType("IMAGE", "Image batch.", "#64b5f6")
MASK = SocketType("MASK", "Mask batch, 1 = masked.", "#81c784")
LATENT = SocketType("LATENT", "Latent batch.", "#ff9cf9")
MODEL = SocketType("MODEL", "Denoising model.", "#b39ddb")
CLIP = SocketType("CLIP", "Text encoder with its tokenizer.", "#ffd500")
VAE = SocketType("VAE", "Image autoencoder.", "#ff6e6e")
CONDITIONING = SocketType("CONDITIONING", "Encoded prompt conditioning.", "#ffa931")
NOISE = SocketType("NOISE", "Noise source.", "#b0bec5")
SIGMAS = SocketType("SIGMAS", "Noise-level schedule.", "#cddc39")
SAMPLER = SocketType("SAMPLER", "Sampling algorithm.", "#ec407a")
GUIDER = SocketType("GUIDER", "Guidance (model with its conditioning).", "#66ffff")
CONTROL_NET = SocketType("CONTROL_NET", "ControlNet model.", "#00d78d")

BUILTIN_TYPES: tuple[SocketType, ...] = (
    ANY, INT, FLOAT, STRING, BOOLEAN, ENUM, IMAGE, MASK, LATENT, MODEL, CLIP, VAE,
    CONDITIONING, NOISE, SIGMAS, SAMPLER, GUIDER, CONTROL_NET,
)

_PRIMITIVES: dict[type, SocketType] = {bool: BOOLEAN, int: INT, float: FLOAT, str: STRING}


class TypeRegistryError(ValueError):
    """Two different socket types were registered under one name."""


class TypeRegistry:
    """The socket types known to one engine, and the rules for which of them connect."""

    def __init__(self) -> None:
        self._types: dict[str, SocketType] = {}
        for socket_type in BUILTIN_TYPES:
            self.register(socket_type)

    def register(self, socket_type: SocketType) -> SocketType:
        known = self._types.get(socket_type.name)
        if known is not None and known != socket_type:
            raise TypeRegistryError(
                f"socket type {socket_type.name!r} is already registered with a different definition"
            )
        self._types[socket_type.name] = socket_type
        return socket_type

    def get(self, name: str) -> SocketType | None:
        return self._types.get(name)

    def __iter__(self) -> typing.Iterator[SocketType]:
        return iter(self._types.values())

    def compatible(self, source: str, target: str) -> bool:
        """Whether an output of type `source` may feed an input of type `target`."""
        if source == target or ANY.name in (source, target):
            return True
        target_type = self._types.get(target)
        return target_type is not None and source in target_type.accepts


def socket_type_of(annotation: Any) -> SocketType:
    """The socket type a node field's annotation declares.

    `int`, `float`, `str`, `bool` map to the primitive types, `Literal[...]` and `enum.Enum`
    subclasses to ENUM, `Optional[X]` to X's type, and `Annotated[..., SocketType]` to that type.
    """
    origin = get_origin(annotation)
    if origin is Annotated:
        for meta in annotation.__metadata__:
            if isinstance(meta, SocketType):
                return meta
        return socket_type_of(get_args(annotation)[0])
    if origin is Literal:
        return ENUM
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return socket_type_of(members[0])
        return ANY
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return ENUM
        for python_type, socket_type in _PRIMITIVES.items():
            if annotation is python_type:
                return socket_type
    if annotation is Any:
        return ANY
    raise TypeError(f"cannot derive a socket type from annotation {annotation!r}")


def choices_of(annotation: Any) -> tuple[Any, ...] | None:
    """The fixed choices of a Literal or Enum annotation, else None."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return choices_of(get_args(annotation)[0])
    if origin is Literal:
        return get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        return choices_of(members[0]) if len(members) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(member.value for member in annotation)
    return None


@dataclass(frozen=True)
class Choices:
    """Field metadata: the valid values are computed when asked (files in a folder, say).

    Use as `name: Annotated[str, Choices(list_checkpoints)]`.
    """

    provider: typing.Callable[[], typing.Sequence[str]]
    kind: str = field(default="", compare=False)
    # Why a value is not among the choices, for the validation message (the folders searched for
    # a file, say); without it the message counts the choices.
    explain_missing: typing.Callable[[str], str] | None = field(default=None, compare=False)

    def values(self) -> list[str]:
        return list(self.provider())
