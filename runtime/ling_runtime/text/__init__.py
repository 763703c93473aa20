"""Text in and out of the model: tokenizer and chat template of a checkpoint, incremental
detokenization with stop strings, and the tool-call parser. Pure text: no engine, no HTTP."""
