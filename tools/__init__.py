"""Developer tools that do not ship in the wheel: the demo builder (`python -m tools.demo build`) and tiny
real models for tests and benchmarks (`tools.tiny`). They import the core (`rlhf`); the core never imports
them. Run from the repository root, where `tools` is importable (pytest adds the root to sys.path)."""
