"""quantkit: turn open-weights LLMs into measured GGUF / AWQ / GPTQ artifacts."""

__version__ = "0.1.0"
