"""The HTTP server: the OpenAI-compatible and SGLang-native API over the engine, and the process
entry (launch.py) that starts the group, the engine and the server."""
