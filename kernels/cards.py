"""The cards the kernels are built for, and which card a tensor's device is.

A card is what decides a kernel's tiles: its compute capability (tensor-core instruction family), the
shared memory one block may use (the ceiling on tile size x pipeline stages) and its number of SMs
(how many programs make a wave). The CPU interpreter is a card of its own: it runs every program in
Python, so it wants few, small-but-not-tiny tiles and one config per kernel.

    card_of(device)   the Card for a torch device (cached per device; "interpreter" for a CPU tensor)
    CARDS             the cards every kernel variant is compiled for (tests/_triton_aot.py --arch)
    pretend(name)     a context in which every device is that card: the cost model and the compile
                      check take a card's tiles without owning one
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

__all__ = ["Card", "CARDS", "INTERPRETER", "card_of", "card_named", "pretend", "interpreting"]


@dataclass(frozen=True)
class Card:
    name: str             # "sm_90", ..., or "interpreter"
    arch: int             # compute capability as major * 10 + minor (0 for the interpreter)
    shared_bytes: int     # shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    sms: int              # streaming multiprocessors (programs per wave, for split reductions)
    family: str           # which config list it takes: "interpreter", "hopper", "ampere" or "small"
    examples: str = ""    # cards of this architecture, for people

    @property
    def is_interpreter(self):
        return self.family == "interpreter"


_KIB = 1024
# The architectures the compile check covers, with their opt-in shared memory per block and a typical SM
# count (the runtime reads the real count from the device).
CARDS = {
    "sm_80": Card("sm_80", 80, 163 * _KIB, 108, "ampere", "A100, A30"),
    "sm_89": Card("sm_89", 89, 99 * _KIB, 142, "small", "L4, L40S, RTX 4090, RTX 6000 Ada"),
    "sm_90": Card("sm_90", 90, 227 * _KIB, 132, "hopper", "H100, H200, GH200"),
    "sm_100": Card("sm_100", 100, 227 * _KIB, 148, "hopper", "B200, GB200"),
    "sm_120": Card("sm_120", 120, 99 * _KIB, 170, "small", "RTX 5090, RTX PRO 6000 Blackwell"),
}
INTERPRETER = Card("interpreter", 0, 1 << 30, 1, "interpreter", "TRITON_INTERPRET=1 on a CPU")

# Other architectures take the nearest listed one's shared memory and family.
_SHARED_BY_ARCH = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 103: 227, 110: 227, 120: 99, 121: 99}

_PRETEND: list[Card] = []
_BY_DEVICE: dict = {}


def interpreting() -> bool:
    """Whether Triton runs through its CPU interpreter in this process (decided when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def card_named(name: str) -> Card:
    if name == "interpreter":
        return INTERPRETER
    if name in CARDS:
        return CARDS[name]
    raise ValueError(f"unknown card {name!r}; known: {', '.join(CARDS)}, interpreter")


def _card_for_arch(arch: int, sms: int) -> Card:
    for card in CARDS.values():
        if card.arch == arch:
            return Card(card.name, arch, card.shared_bytes, sms, card.family, card.examples)
    kib = _SHARED_BY_ARCH.get(arch) or (227 if arch >= 90 else 99)
    family = "hopper" if kib >= 227 else ("ampere" if kib >= 163 else "small")
    return Card(f"sm_{arch}", arch, kib * _KIB, sms, family)


def card_of(device) -> Card:
    """The card that runs kernels on `device` (a torch.device or string). A CPU device is the
    interpreter; inside pretend(name), every device is that card."""
    if _PRETEND:
        return _PRETEND[-1]
    card = _BY_DEVICE.get(device)
    if card is None:
        import torch
        dev = torch.device(device)
        if dev.type != "cuda":
            card = INTERPRETER
        else:
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(index)
            card = _card_for_arch(props.major * 10 + props.minor, props.multi_processor_count)
        _BY_DEVICE[device] = card
    return card


@contextlib.contextmanager
def pretend(name: str | Card):
    """Every device is card `name` inside: its tiles, configs and split counts, without the card."""
    _PRETEND.append(card_named(name) if isinstance(name, str) else name)
    try:
        yield _PRETEND[-1]
    finally:
        _PRETEND.pop()
