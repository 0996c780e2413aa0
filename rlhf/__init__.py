"""rlhf-tui core: store, config, models, sampling, reward model, PPO, engine, CLI.

Nothing here imports Textual, and importing this package loads no torch: heavy modules import it
themselves, so the UI process stays light.
"""

from .quantization import quiet_bitsandbytes_logging, refuse_hub_kernels

__version__ = "0.1.0"

# Before anything imports peft, which imports bitsandbytes.
quiet_bitsandbytes_logging()
refuse_hub_kernels()
