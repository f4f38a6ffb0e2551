"""meowdread: QLoRA fine-tuning of Phi-3-mini on existential cat memes, with PyTorch Lightning."""

__version__ = "0.1.0"
