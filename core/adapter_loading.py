"""Reading a published adapter to run it next to others in one model (serving and evaluations alike).

The weights are loaded from the very bytes whose sha256 was checked, the Bone config is parsed, and an
adapter that trained biases is refused: its biases live in the shared base layers, so running it would change
every other adapter's (and the base model's) outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.errors import Conflict
from core.registry import AdapterInfo, AdapterRegistry

if TYPE_CHECKING:
    from bone import BoneConfig


def read_adapter(
    registry: AdapterRegistry, name: str, *, param: str = "adapter"
) -> tuple[BoneConfig, dict[str, Any], AdapterInfo]:
    """(Bone config, tensors on the CPU, registry metadata) of adapter ``name``; errors name ``param``."""
    from bone import BoneConfig

    tensors, info = registry.verified_tensors(name)
    config = BoneConfig.from_dict(registry.adapter_config(name))
    if config.bias != "none":
        raise Conflict(
            f"adapter {name!r} trained biases (bias={config.bias!r}), which live in the shared base model; "
            "it cannot be run next to other adapters",
            param=param,
            code="unservable_adapter",
        )
    return config, tensors, info
