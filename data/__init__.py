"""Bundled assets (demo prompts, the tiny demo model), installed as `rlhf.data`."""
