"""HTTP serving: OpenAI-compatible and SGLang-native routes, tokenizer, tool parsing, metrics."""
