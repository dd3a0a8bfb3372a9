"""The DeepSeek-V2/V3 model family in torch: config, layers, checkpoint loading, tokenizers."""
