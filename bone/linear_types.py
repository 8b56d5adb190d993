"""The layer types Bone can wrap: ``torch.nn.Linear`` and transformers' ``Conv1D`` (GPT-2 style, weight stored
(in, out)). Its own module so the layer and the target search share it without importing each other."""

from __future__ import annotations

from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency, but keep bone importable

    class Conv1D(nn.Module):  # type: ignore[no-redef]
        pass


SUPPORTED_TYPES = (nn.Linear, Conv1D)
