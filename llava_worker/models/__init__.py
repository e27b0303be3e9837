"""The model layer: checkpoint → LoadedModel, and prompt + images → model inputs."""
