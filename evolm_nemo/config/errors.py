"""The one error type for bad user input: it names the key (or file) and the fix, printed as one line."""


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")
