"""Speculative steps (binary and three-tier); filled in below."""


class SpecDecoder:
    def __init__(self, engine):
        self.engine = engine

    def begin(self, scheduled):
        raise NotImplementedError
