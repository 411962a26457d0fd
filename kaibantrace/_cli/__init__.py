"""The ``kaibantrace`` command: see, stop, audit and flush telemetry."""
