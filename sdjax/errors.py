"""The error a user of the pipeline API sees for a model path or argument sdjax cannot use."""


class PipelineError(ValueError):
    """A model path or a generate() argument sdjax cannot use; the message says what is accepted."""
