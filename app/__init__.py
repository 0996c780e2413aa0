"""rlhf-tui's Textual UI. Never imports torch, transformers, peft or bitsandbytes: heavy work runs
in the engine process (`rlhf.engine`)."""
