"""LoRA both ways: a PEFT adapter read as the fine-tune it stands for (``adapter``), and a PEFT
adapter extracted from a full fine-tune (``extract``, the ``extract-lora`` command)."""

from .adapter import is_adapter, open_adapter

__all__ = ["is_adapter", "open_adapter"]
