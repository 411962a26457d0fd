"""Where an event starts: the ``Telemetry`` facade and its routing, the decorators and the
wrappers they build, timing and outcomes, the signal budget, and a CLI's first run."""
