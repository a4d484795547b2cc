"""The wire protocol (OpenAI-compatible request and response models) shared by the server and its clients."""
