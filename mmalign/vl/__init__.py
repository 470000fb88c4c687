"""Vision-language models: LLaVA-style VLM DPO (offline and online), BDHS preference data."""
